"""The demo, three ways: its functions called directly, a ``gradio_client`` round trip against a
launched app, and a real headless browser (Debian's chromium through selenium) that uploads a
photo, clicks protect and saves a screenshot to ``outputs/demo-screenshot.png``; and the page
under hostile input, parallel load and over time (issue 19: pixel cap, bad files, a file served
while rewritten, files never deleted)."""
import copy
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from toap_kit import demo, protect, zoo
from toap_kit.engine import DEFAULT_ENGINE, DISPLAY, Engine
from toap_kit.config import OUTPUT_DIR
from toap_kit.data import DATA_DIR
from toap_kit.odd_inputs import _bomb_png, shipped_photos
from toap_kit.postprocess import to_pil
from toap_kit.protect import ProtectError

SMALL = "vgg_csq_64"  # a small hash CNN: the app in the round-trip tests answers in well under a second
PHOTO = DATA_DIR / "photos250" / "George_W_Bush" / "01.jpg"  # an evaluation identity's full photo
SCREENSHOT = OUTPUT_DIR / "demo-screenshot.png"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def engine():
    return Engine()


@pytest.fixture(scope="module")
def small_engine(engine):
    """The same engine offering two small CNNs only, ``SMALL`` first (the app loads only it)."""
    small = copy.copy(engine)
    small.models, small.default_model = [SMALL, "mobilenet_csq_32"], SMALL
    return small


@pytest.fixture(scope="module")
def results():
    """The page's result folder, so that tests can look into it."""
    folder = demo.ResultFolder()
    yield folder
    folder.remove()


@pytest.fixture(scope="module")
def small_app(small_engine, results):
    """The page over ``small_engine`` (built once: the callbacks are called directly, and
    ``app_url`` launches it)."""
    return demo.build_demo(small_engine, results)


def _callbacks(app) -> dict:
    return {f.api_name: f.fn for f in app.fns.values() if f.api_name}


# ------------------------------------------------------------------ the functions
def test_search_shipped_query_marks_matches(engine):
    image, name = engine.query(0)
    res = engine.search(image, zoo.names()[0], identity=name)
    assert len(res.indices) == 10 and res.distances == sorted(res.distances)
    assert res.correct == [n == name for n in res.names]
    with pytest.raises(ValueError, match="unknown model"):
        engine.search(image, "nope")
    with pytest.raises(IndexError):
        engine.query(10_000)


def test_default_engine_is_a_real_recognizer_that_finds_the_shipped_queries_people(engine):
    # the demo opens on dlib_itq_32: before protection, it must find people
    assert engine.default_model == DEFAULT_ENGINE == "dlib_itq_32"
    hits = []
    for n in range(0, 60, 3):
        image, name = engine.query(n)
        hits.append(engine.search(image, engine.default_model, identity=name).correct[0])
    assert sum(hits) >= 12, f"top-1 right for only {sum(hits)} of 20 queries"


def test_upload_path_crops_and_searches(engine):
    photo = Image.open(DATA_DIR / "photos250" / "Bill_Clinton" / "01.jpg").convert("RGB")
    shown, gallery, summary = demo.search_upload(engine, photo, zoo.names()[0])
    assert shown.size == (DISPLAY, DISPLAY)
    assert len(gallery) == 10 and "unknown" in summary


def test_examples_are_evaluation_people_with_other_photos_in_the_database(engine):
    exs = demo.examples(engine)
    photos = [e for e in exs if e.kind == "photo"]
    assert len(photos) == 7 and {e.identity for e in photos} <= set(engine.query_names)
    assert all(engine.db_names.count(e.identity) >= 1 for e in exs)
    assert photos and demo.examples(engine)[0] == photos[0], "the page opens on the first shipped photo"
    assert demo.example_photo(engine, photos[0]).size == (250, 250)
    face = next(e for e in exs if e.kind == "face")
    assert demo.example_photo(engine, face).size == (DISPLAY, DISPLAY)


def test_the_intro_states_the_measured_per_photo_result():
    s = demo.measured_sentence()  # from results/toap.json's per-photo table (make results)
    assert s.startswith("Measured on the") and DEFAULT_ENGINE in s and "per-photo refinement" in s
    # and what networks the protection never used keep (results/networks.json, issue 29)
    assert "never used" in s and "--against" in s


def test_engine_labels_name_the_threat_tier():
    assert demo.engine_label("dlib_itq_32") == (
        "dlib_itq_32 — engine-known-backbone (protector used this engine's network, not its hash layer)")
    assert demo.engine_label("faceres_itq_64", refine=True) == (
        "faceres_itq_64 — engine-blackbox (never seen, nor its network)")  # a network nobody ran
    assert demo.engine_label("vgg_dpsh_32").startswith("vgg_dpsh_32 — cnn-teacher-known")  # toap-mid is dlib-first
    assert demo.engine_label("dlib_itq_64", "mid", refine=True).startswith("dlib_itq_64 — engine-known-backbone")
    assert demo.upload_spec("JPEG", 62.4) == "jpeg:62" and demo.upload_spec("none") == "none"
    assert demo.upload_spec("facebook") == "facebook"
    with pytest.raises(ValueError, match="unknown upload"):
        demo.upload_spec("myspace")


def test_protect_and_search_on_a_shipped_photo(engine, tmp_path):
    photo = Image.open(PHOTO)
    res = demo.protect_and_search(engine, photo, "mid", SMALL, "jpeg:75", identity="George_W_Bush")
    assert res.original.size == res.protected.size == res.amplified.size == (250, 250)
    diff = np.abs(np.asarray(res.protected, np.int16) - np.asarray(res.original, np.int16))
    assert diff.max() <= 8 and diff.max() > 0, "|protected - original| <= eps = 8/255, and not zero"
    assert 30 < res.psnr < 45 and 0.8 < res.ssim < 1
    assert len(res.before.names) == len(res.after.names) == 10
    assert res.before.correct == [n == "George_W_Bush" for n in res.before.names]
    assert res.hits_after == sum(res.after.correct) and res.found == (res.hits_after > 0)
    assert res.verdict.startswith("FOUND" if res.found else "NOT FOUND") and "top 10" in res.verdict
    assert list(res.timings) == ["find the face", "search before", "protect", "simulate upload", "search after",
                                 "measure"]
    assert res.tier == "cnn-teacher-known" and len(res.faces) == 1
    saved = demo.save_protected(res.protected, tmp_path, "George W. Bush")
    assert saved.name == "George_W._Bush-protected.jpg" and Image.open(saved).size == (250, 250)
    assert [p.name for p in tmp_path.iterdir()] == [saved.name], "no temporary file left behind"
    # a photo of unknown identity: marked against the person its original retrieved most
    res = demo.protect_and_search(engine, photo, "mid", SMALL, "none")
    assert not res.identity_known and res.target in res.before.names and "identity is unknown" in res.verdict


def test_a_face_crop_example_is_protected_as_a_whole(engine):
    image, name = engine.query(0)
    res = demo.protect_and_search(engine, to_pil(image), "low", SMALL, "facebook", identity=name,
                                  face_crop_input=True)
    assert res.faces == [(0, 0, DISPLAY)]
    diff = np.abs(np.asarray(res.protected, np.int16) - np.asarray(res.original, np.int16))
    assert 0 < diff.max() <= 4


def test_the_real_engine_finds_fewer_photos_after_protection(engine):
    """A guard, not a benchmark (``make results`` measures it: results/toap.md, per photo): on
    the shipped photos, mid strength after Facebook's profile leaves dlib_itq_32 fewer photos of
    the person in its top 10, and far fewer with the page's default, the per-photo refinement."""
    before = universal = refined = 0
    for ex in [e for e in demo.examples(engine) if e.kind == "photo"]:
        photo = demo.example_photo(engine, ex)
        res = demo.protect_and_search(engine, photo, "mid", "dlib_itq_32", "facebook", identity=ex.identity)
        ref = demo.protect_and_search(engine, photo, "mid", "dlib_itq_32", "facebook", identity=ex.identity,
                                      refine=True)
        assert ref.refined and ref.tier == "engine-known-backbone" and "refine and protect" in ref.timings
        before, universal, refined = before + res.hits_before, universal + res.hits_after, refined + ref.hits_after
    assert universal < 0.75 * before and refined < 0.25 * before, (before, universal, refined)


def test_several_faces_are_all_protected_and_the_largest_searched(engine):
    a, b = Image.open(PHOTO).convert("RGB"), Image.open(shipped_photos()[6]).convert("RGB").resize((200, 200))
    pair = Image.new("RGB", (460, 250), "white")
    pair.paste(a, (0, 0))
    pair.paste(b, (260, 25))
    res = demo.protect_and_search(engine, pair, "mid", SMALL, "none")
    assert len(res.faces) == 2 and res.notes[0].startswith("2 faces found: all protected")
    assert res.faces[0][2] >= res.faces[1][2], "largest first"


def test_no_face_and_bad_inputs_get_clear_errors(engine):
    flat = Image.new("RGB", (300, 300), (120, 130, 140))
    with pytest.raises(ProtectError, match="No face was found"):
        demo.protect_and_search(engine, flat, "mid", SMALL)
    with pytest.raises(ProtectError, match="too small"):
        demo.protect_and_search(engine, Image.new("RGB", (8, 8)), "mid", SMALL)
    with pytest.raises(ValueError, match="unknown engine"):
        demo.protect_and_search(engine, flat, "mid", "nope")
    with pytest.raises(ValueError, match="post-processing spec"):
        demo.protect_and_search(engine, flat, "mid", SMALL, "jpeg:500")
    with pytest.raises(ProtectError, match="unknown strength"):
        demo.protect_and_search(engine, flat, "extreme", SMALL)


def test_page_callbacks_turn_bad_files_into_readable_errors(small_app, tmp_path):
    import gradio as gr

    protect_fn = _callbacks(small_app)["protect"]
    junk = tmp_path / "holiday.jpg"
    junk.write_bytes(b"this is not a photo")
    with pytest.raises(gr.Error, match="cannot be protected"):
        protect_fn(str(junk), None, "mid", SMALL, "none", 75, False)
    flat = tmp_path / "wall.png"
    Image.new("RGB", (300, 300), (120, 130, 140)).save(flat)
    with pytest.raises(gr.Error, match="No face was found"):
        protect_fn(str(flat), None, "mid", SMALL, "none", 75, False)
    with pytest.raises(gr.Error, match="Upload a photo, or pick"):
        protect_fn(None, None, "mid", SMALL, "none", 75, False)
    out = protect_fn(None, 0, "mid", SMALL, "JPEG", 80, True)  # the first shipped example, refined
    assert len(out) == 8 and len(out[5]) == len(out[6]) == 10 and "top 10" in out[3]
    assert "Time per step" in out[4] and "refined for this photo" in out[4] and Path(out[7]).is_file()


# ------------------------------------------------------------------ a launched app
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(small_app):
    port = _free_port()
    small_app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                     max_file_size=demo.MAX_UPLOAD)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        small_app.close()


def test_gradio_client_round_trip(app_url):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    shown, gallery, summary = client.predict(3, SMALL, api_name="/search_shipped")
    assert len(gallery) == 10 and "of the top 10 are" in summary
    out = client.predict(handle_file(str(PHOTO)), "high", SMALL, "facebook", 75, False, api_name="/protect")
    original, protected, amplified, verdict, metrics, before, after, download = out
    assert len(before) == len(after) == 10 and "top 10" in verdict and "PSNR" in metrics
    assert Image.open(download).size == Image.open(original).size == (250, 250)
    assert [b["caption"] for b in before] != [a["caption"] for a in after]


# ------------------------------------------------------------------ hostile input, load, cleanup (issue 19)
def test_search_only_refuses_photos_above_the_pixel_cap(engine, small_app, monkeypatch):
    """Item 8: the plain search decoded a 144-megapixel upload; it must refuse what protect refuses."""
    import gradio as gr

    monkeypatch.setattr(protect, "MAX_PIXELS", 200 * 200)  # the shipped 250x250 photo is above it
    with pytest.raises(ProtectError, match="image too large: 250x250"):
        demo.search_upload(engine, Image.open(PHOTO), SMALL)  # a PIL image (library callers)
    with pytest.raises(ProtectError, match="image too large: 250x250"):
        demo.search_upload(engine, PHOTO, SMALL)  # a file
    with pytest.raises(gr.Error, match="cannot be searched: image too large: 250x250"):
        _callbacks(small_app)["search_upload"](str(PHOTO), SMALL)
    with pytest.raises(gr.Error, match="cannot be protected: image too large"):  # the Protect tab agrees
        _callbacks(small_app)["protect"](str(PHOTO), None, "mid", SMALL, "none", 75, False)


BAD_FILES = {"empty.jpg": (b"", "empty file"),
             "notes.png": (b"my holiday notes, not a photo", "not an image file"),
             "bomb.png": (_bomb_png(), "decompression bomb")}


def test_search_only_gives_the_kits_reason_for_a_bad_file(small_app, tmp_path):
    """Item 9: the file is read by ``protect.open_photo``, not decoded by Gradio first."""
    import gradio as gr

    search = _callbacks(small_app)["search_upload"]
    for name, (content, reason) in BAD_FILES.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(gr.Error) as e:
            search(str(tmp_path / name), SMALL)
        message = e.value.message
        assert message.startswith("This photo cannot be searched: ") and reason in message and "\n" not in message


def test_search_only_over_http_says_why_a_file_is_refused(app_url, results, tmp_path):
    """Item 9 end to end: the client gets the kit's one-line reason, not Gradio's generic error."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(app_url, verbose=False, download_files=False)
    for name, (content, reason) in BAD_FILES.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(AppError, match=f"cannot be searched: .*{reason}"):
            client.predict(handle_file(str(tmp_path / name)), SMALL, api_name="/search_upload")
    shown, gallery, summary = client.predict(handle_file(str(PHOTO)), SMALL, api_name="/search_upload")
    assert len(gallery) == 10 and "unknown" in summary
    # served straight from the request's own folder (a static path), not from a copy in Gradio's cache
    assert Path(shown["path"]).parent.parent == results.path


def _served_files(out: tuple) -> list[str]:
    """The files a protect callback's outputs point to: 3 photos, 2 x 10 gallery images, the download."""
    return [*out[:3], *(f for f, _ in out[5]), *(f for f, _ in out[6]), out[7]]


def test_each_request_serves_new_files_from_its_own_folder(small_app, results):
    """Item 10's cause: Gradio wrote the page's PIL outputs under a hash of their bytes, so the
    same photo from two users was rewritten while it was being sent; the page now writes every
    file it serves into its request's own folder."""
    protect_fn, search_fn = _callbacks(small_app)["protect"], _callbacks(small_app)["search_shipped"]
    a, b = (protect_fn(None, 0, "mid", SMALL, "none", 75, False) for _ in range(2))
    fa, fb = _served_files(a), _served_files(b)
    assert all(isinstance(f, str) and Path(f).is_file() for f in fa + fb)
    assert len(fa) == 24 and not set(fa) & set(fb), "no file is shared between two requests"
    folders = {Path(f).parent for f in fa}, {Path(f).parent for f in fb}
    assert all(len(d) == 1 and next(iter(d)).parent == results.path for d in folders) and folders[0] != folders[1]
    shown, gallery, _ = search_fn(3, SMALL)  # the plain search too
    assert Path(shown).parent.parent == results.path and all(Path(f).parent == Path(shown).parent for f, _ in gallery)


def test_the_demo_sends_no_usage_analytics(small_engine, results, monkeypatch):
    """People bring their own face photos: the app must not report usage to Gradio's servers, even
    where the environment leaves Gradio's analytics on (conftest.py turns them off for the tests)."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "True")
    app = demo.build_demo(small_engine, results)
    assert app.analytics_enabled is False and app.config["analytics_enabled"] is False


def test_the_queue_is_bounded_and_protections_run_one_at_a_time(small_app):
    """Item 10: parallel users wait in a bounded queue; every event that protects shares one
    concurrency group (a click, an example, a changed control, the page opening)."""
    assert small_app._queue.max_size == demo.QUEUE_SIZE
    protects = [f for f in small_app.fns.values() if "download" in [o.elem_id for o in f.outputs]]
    assert len(protects) == 8
    assert all(f.concurrency_id == "protect" and f.concurrency_limit == demo.PROTECT_JOBS == 1 for f in protects)


def test_parallel_protect_requests_all_succeed_with_complete_files(app_url, results, tmp_path):
    """Item 10 under load: 6 users protect the same photo at once (it failed 2 in 6 before)."""
    from gradio_client import Client, handle_file

    before = len(list(results.path.glob("*/01-protected.jpg")))
    client = Client(app_url, verbose=False, download_files=str(tmp_path))
    jobs = [client.submit(handle_file(str(PHOTO)), "mid", SMALL, "facebook", 75, False, api_name="/protect")
            for _ in range(6)]
    for out in (job.result(timeout=300) for job in jobs):
        original, protected, amplified, verdict, metrics, top_before, top_after, download = out
        assert "top 10" in verdict and len(top_before) == len(top_after) == 10
        for f in (original, protected, amplified, download, *(g["image"] for g in top_before + top_after)):
            with Image.open(f) as im:
                im.load()  # a file cut short while it was sent fails here
        assert Image.open(download).size == (250, 250)
    assert len(list(results.path.glob("*/01-protected.jpg"))) == before + 6, "each request wrote its own download"


def test_old_results_are_deleted_and_gradio_deletes_old_uploads(small_app, results):
    """Item 11: a request's folder goes after ``KEEP_RESULTS_S`` (at the next request); the
    uploads in Gradio's cache after the same time (``delete_cache``)."""
    assert small_app.delete_cache == (demo.KEEP_RESULTS_S // 6, demo.KEEP_RESULTS_S)
    old, recent = results.new_request(), results.new_request()
    (old / "photo-protected.jpg").write_bytes(b"jpeg")
    past = time.time() - demo.KEEP_RESULTS_S - 60
    os.utime(old, (past, past))
    new = results.new_request()
    assert not old.exists() and recent.is_dir() and new.is_dir()
    os.utime(recent, (past, past))
    assert results.prune() == 1 and not recent.exists() and new.is_dir()


def test_the_result_folder_is_removed_when_the_process_exits(tmp_path):
    """Item 11: nothing of the page's is left behind by a process that ends."""
    code = ("from toap_kit.demo import ResultFolder; f = ResultFolder(); "
            "(f.new_request() / 'photo-protected.jpg').write_bytes(b'jpeg'); print(f.path)")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=Path(demo.__file__).parents[1], check=True)
    folder = Path(out.stdout.strip())
    assert folder.parent == tmp_path and folder.name.startswith("toap-demo-") and not folder.exists()
    folder = demo.ResultFolder()
    (folder.new_request() / "x.png").write_bytes(b"png")
    folder.remove()
    assert not folder.path.exists()


def _browser():
    """A headless Debian chromium driven through its own chromedriver (never a download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "1"  # Selenium Manager must not fetch a browser or driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # no background networking: the sandbox refuses outside connections, many at a time
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1400,2300"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _gallery(driver, elem_id: str) -> list[str]:
    """Captions of a gallery's thumbnails, in order."""
    from selenium.webdriver.common.by import By

    return [e.get_attribute("alt") for e in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")]


def test_browser_uploads_a_photo_protects_it_and_shows_both_galleries(app_url, small_engine):
    missing = [n for n, p in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not p or not Path(p).exists()]
    if missing:
        reason = (f"{' and '.join(missing)} not installed (`apt-get install -y chromium chromium-driver`; "
                  "`make test` does it where it can)")
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {reason}")
        pytest.skip(reason)
    pytest.importorskip("selenium", reason="selenium not installed (pip install -e '.[dev]')")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser()
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(app_url)
        # the page opens on a shipped example with both galleries filled
        wait.until(lambda d: len(_gallery(d, "before-gallery")) == 10 and len(_gallery(d, "after-gallery")) == 10)
        opening = driver.find_element(By.ID, "verdict").text
        assert demo.examples(small_engine)[0].identity.replace("_", " ") in opening  # the first example
        driver.find_element(By.CSS_SELECTOR, "#photo-upload input[type=file]").send_keys(str(PHOTO))
        wait.until(EC.presence_of_element_located(
            (By.CSS_SELECTOR, f'#photo-upload td.filename[aria-label="{PHOTO.name}"]')))
        time.sleep(0.5)  # the upload event resets the picked example
        driver.find_element(By.ID, "protect-button").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "verdict"), "identity is unknown"))
        wait.until(lambda d: len(_gallery(d, "before-gallery")) == 10 and len(_gallery(d, "after-gallery")) == 10)
        before, after = _gallery(driver, "before-gallery"), _gallery(driver, "after-gallery")
        assert before != after, "the protected photo's results must differ from the original's"
        verdict = driver.find_element(By.ID, "verdict").text
        assert "top 10" in verdict and verdict != opening
        driver.execute_script("window.scrollTo(0, 0)")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(SCREENSHOT)) and SCREENSHOT.stat().st_size > 50_000
        # clicking a shipped example protects and searches it at once (its identity is known)
        third = demo.examples(small_engine)[2].identity.replace("_", " ")
        driver.find_elements(By.CSS_SELECTOR, "#examples button.thumbnail-item")[2].click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "verdict"), third))
    finally:
        driver.quit()


def test_demo_app_refuses_a_bad_device_in_one_line():
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, str(root / "demo_app.py"), "--port", "1"], capture_output=True, text=True,
                         env={**os.environ, "TOAP_DEVICE": "bogus"}, cwd=root, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines()[-1] == "demo_app.py: error: TOAP_DEVICE='bogus' is not a torch device (try cpu or cuda)"
