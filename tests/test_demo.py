import socket

import pytest
from PIL import Image

from toap_kit import demo, zoo
from toap_kit.data import DATA_DIR


@pytest.fixture(scope="module")
def engine():
    return demo.Engine()


def test_search_shipped_query_marks_matches(engine):
    image, name = engine.query(0)
    res = engine.search(image, zoo.names()[0], identity=name)
    assert len(res.indices) == 10 and res.distances == sorted(res.distances)
    assert res.correct == [n == name for n in res.names]
    with pytest.raises(ValueError, match="unknown model"):
        engine.search(image, "nope")
    with pytest.raises(IndexError):
        engine.query(10_000)


def test_default_engine_finds_the_shipped_queries_people(engine):
    # the demo opens on its best engine: before protection, it must find people
    assert engine.default_model in engine.models
    hits = []
    for n in range(0, 60, 3):
        image, name = engine.query(n)
        hits.append(engine.search(image, engine.default_model, identity=name).correct[0])
    assert sum(hits) >= 12, f"top-1 right for only {sum(hits)} of 20 queries"


def test_upload_path_crops_and_searches(engine):
    photo = Image.open(DATA_DIR / "photos250" / "Bill_Clinton" / "01.jpg").convert("RGB")
    shown, gallery, summary = demo.search_upload(engine, photo, zoo.names()[0])
    assert shown.size == (demo.DISPLAY, demo.DISPLAY)
    assert len(gallery) == 10 and "unknown" in summary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gradio_client_round_trip(engine):
    from gradio_client import Client

    app = demo.build_demo(engine)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        shown, gallery, summary = client.predict(3, zoo.names()[0], api_name="/search_shipped")
        assert len(gallery) == 10
        assert "of the top 10 are" in summary
    finally:
        app.close()
