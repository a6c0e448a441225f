"""Write the student release of the course with nbgrader (``make student``).

    python docs/make_student.py [--out student] [--course DIR]

Every notebook of ``notebooks/`` is copied into an nbgrader course directory as the assignment
``toap_course`` (``source/toap_course/*.ipynb`` and an ``nbgrader_config.py``), and
``nbgrader generate_assignment`` makes the release: in each solution cell the code between
``### BEGIN SOLUTION`` and ``### END SOLUTION`` becomes nbgrader's stub
``raise NotImplementedError()``, outputs are cleared, the check cells are locked and
checksummed. The release is checked (no solution text left) and written to ``OUT/`` (default
``student/``, git-ignored), replacing what was there.

The course directory is temporary unless ``--course DIR`` names one: keep it to grade, since
its ``gradebook.db`` holds the assignment and the checks' points (put the students' notebooks in
``DIR/submitted/<student>/toap_course/`` and run ``nbgrader autograde toap_course`` in ``DIR``,
with the kit's venv activated: nbgrader calls ``alembic`` from the PATH; ``nbgrader export``
writes ``grades.csv``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
ASSIGNMENT = "toap_course"
MARKERS = ("BEGIN SOLUTION", "END SOLUTION")  # nbgrader's delimiters (ClearSolutions)
STUB = "raise NotImplementedError()"
CONFIG = """c = get_config()  # noqa: F821 (nbgrader's config loader defines it)
c.CourseDirectory.root = {root!r}
c.CourseDirectory.course_id = "toap_kit"
c.CourseDirectory.db_url = "sqlite:///" + {db!r}
c.ClearSolutions.code_stub = {{"python": "# YOUR CODE HERE\\n{stub}"}}
c.Execute.timeout = 3600  # autograde runs whole chapters: some cells take minutes at full size
"""


def solution_cells(nb: dict) -> list[dict]:
    """The nbgrader solution cells of a notebook (JSON)."""
    return [c for c in nb["cells"] if c.get("metadata", {}).get("nbgrader", {}).get("solution")]


def check_release(source: dict, release: dict, name: str) -> None:
    """Raise ``ValueError`` if the student copy ``release`` of ``source`` leaks a solution: a
    marker left anywhere, a solution cell not stubbed, or a line of a solution in its cell."""
    for cell in release["cells"]:
        text = "".join(cell["source"])
        if any(m in text for m in MARKERS):
            raise ValueError(f"{name}: a solution marker is left in cell {cell.get('id')}")
        if cell.get("outputs"):
            raise ValueError(f"{name}: cell {cell.get('id')} keeps its outputs")
    stubs = {c["metadata"]["nbgrader"]["grade_id"]: "".join(c["source"]) for c in solution_cells(release)}
    for cell in solution_cells(source):
        gid = cell["metadata"]["nbgrader"]["grade_id"]
        if gid not in stubs or STUB not in stubs[gid]:
            raise ValueError(f"{name}: solution cell {gid} is not stubbed in the release")
        lines = "".join(cell["source"]).splitlines()
        if MARKERS[0] not in "\n".join(lines):
            continue  # a whole-cell solution: nbgrader replaces all of it
        start = next(i for i, l in enumerate(lines) if MARKERS[0] in l)
        end = next(i for i, l in enumerate(lines) if MARKERS[1] in l)
        kept = {l.strip() for l in lines[:start] + lines[end + 1:]}
        stub_lines = {l.strip() for l in stubs[gid].splitlines()}
        leaked = [l for l in lines[start + 1:end] if l.strip() and l.strip() not in kept and l.strip() in stub_lines]
        if leaked:
            raise ValueError(f"{name}: solution cell {gid} leaks {leaked[0].strip()!r}")


def build(out: Path, course: Path | None = None, notebooks: Path = NOTEBOOKS) -> list[Path]:
    """Release every notebook of ``notebooks`` into ``out`` with nbgrader; returns the written paths."""
    out = Path(out).resolve()
    keep = course is not None
    course = Path(course).resolve() if keep else Path(tempfile.mkdtemp(prefix="toap-course-"))
    try:
        source = course / "source" / ASSIGNMENT
        if source.exists():
            shutil.rmtree(source)
        source.mkdir(parents=True)
        paths = sorted(Path(notebooks).glob("*.ipynb"))
        if not paths:
            raise FileNotFoundError(f"no notebooks in {notebooks}")
        for p in paths:
            shutil.copy2(p, source / p.name)
        (course / "nbgrader_config.py").write_text(
            CONFIG.format(root=str(course), db=str(course / "gradebook.db"), stub=STUB))
        # only this course's config (the user's own Jupyter config must not change the release), and
        # this Python's scripts first on PATH: nbgrader runs `alembic` to set up its gradebook
        env = {**os.environ, "JUPYTER_CONFIG_DIR": str(course / ".jupyter"),
               "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        run = subprocess.run([sys.executable, "-m", "nbgrader", "generate_assignment", ASSIGNMENT, "--force"],
                             cwd=course, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"nbgrader generate_assignment failed:\n{run.stdout}\n{run.stderr}")
        release = course / "release" / ASSIGNMENT
        for p in paths:
            check_release(json.loads(p.read_text()), json.loads((release / p.name).read_text()), p.name)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(release, tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
        return [out / p.name for p in paths]
    finally:
        if not keep:
            shutil.rmtree(course, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "student", help="where the student notebooks go")
    ap.add_argument("--course", type=Path, default=None,
                    help="keep the nbgrader course directory here (gradebook.db for `nbgrader autograde`)")
    args = ap.parse_args(argv)
    written = build(args.out, args.course)
    n = sum(len(solution_cells(json.loads(p.read_text()))) for p in written)
    print(f"{len(written)} notebooks, {n} exercises stubbed -> {args.out}")


if __name__ == "__main__":
    main()
