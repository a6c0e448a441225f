import os

import pytest
import torch

os.environ.setdefault("TOAP_FAST", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def faces():
    from toap_kit.data import load_faceset

    return load_faceset("lfw158", 48)


@pytest.fixture(scope="session")
def milvus_server():
    """A Milvus server for the session: ``TOAP_MILVUS_URI`` when set (an external server or a
    cluster: yields the URI, a string), else one started here from the ``milvus`` wheel
    (``toap_kit.milvus_server.start``: yields the ``LocalServer``, ``.uri`` its URI), stopped and
    its folder removed at the end of the session, whether the tests passed or not. Skips the
    tests that need it, with the reason, where the server cannot run."""
    uri = os.environ.get("TOAP_MILVUS_URI")
    if uri:
        yield uri
        return
    from toap_kit import milvus_server as ms

    try:
        server = ms.start()
    except ms.ServerUnavailable as e:
        pytest.skip(f"no Milvus server: {e}")
    _servers.append(server)
    try:
        yield server
    finally:
        server.stop()
        _servers.remove(server)


_servers = []  # the session's started Milvus server, while it runs


def pytest_runtest_teardown(item, nextitem):
    """Stop the session's Milvus server after the last test that uses it, not at the session's
    end: idle, it still takes about 3% of a core and 250 MB, and the notebooks run after the tests.
    (``stop`` is idempotent: the fixture's own teardown then finds nothing to do.)"""
    if not _servers:
        return
    items = item.session.items
    rest = items[items.index(nextitem):] if nextitem is not None else []
    if not any("milvus_server" in getattr(i, "fixturenames", ()) for i in rest):
        _servers[0].stop()


@pytest.fixture
def milvus_uri(milvus_server):
    """The session's Milvus server URI (``milvus_server``)."""
    return milvus_server if isinstance(milvus_server, str) else milvus_server.uri


@pytest.fixture(autouse=True)
def _autograd_left_on():
    """A test (or the code it calls) that switches autograd off globally breaks every later test
    that needs gradients, far from the cause: fail the culprit instead."""
    yield
    assert torch.is_grad_enabled(), "this test left torch.set_grad_enabled(False) on: scope it (torch.no_grad())"
