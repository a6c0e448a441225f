"""A Milvus server on this machine, for the tests and ``bench scale``: the Milvus standalone
binary (embedded etcd, local storage) that the ``milvus`` package (2.3.5, a manylinux wheel,
``pip install milvus==2.3.5``, in the kit's ``dev`` extras) ships; no Docker.

    >>> from toap_kit import index, milvus_server
    >>> with milvus_server.start() as server:         # about 10 s on 2 cores
    ...     ix = index.open_index(server.uri, bits=64)  # http://127.0.0.1:PORT
    ... # stopped: the process is gone and its folder removed

Everything the server writes (its unpacked binary, about 250 MB, configuration, logs, etcd and
segment data) lives in one temporary folder, removed by ``stop()``. Its ports are free ones
(the client port and the embedded etcd's two picked by the OS, the others probed upward from
Milvus's defaults), so two servers (two test sessions) run side by side. The wait for
readiness is bounded (``timeout_s``): the health endpoint answers OK and a client lists the
collections. Milvus 2.3 listens on every interface (``*:PORT``), not only on loopback, and
without authentication: use it on a trusted machine, as the tests do.

``ServerUnavailable`` means the server cannot run here (no ``milvus`` package, or a binary this
system cannot execute or load): the tests skip with that reason. A server that exits at start
for another reason raises ``RuntimeError``, one that runs but is not ready in time
``TimeoutError``, both with its log's last lines.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LocalServer", "ServerUnavailable", "start"]

log = logging.getLogger(__name__)

class ServerUnavailable(RuntimeError):
    """The Milvus binary cannot run on this machine (the message says why)."""


@dataclass
class LocalServer:
    """A running server: ``uri`` (``http://127.0.0.1:PORT``), ``port``, ``folder`` (all its
    files) and ``process`` (``None`` once stopped). A context manager that stops it."""

    uri: str
    port: int
    folder: Path
    process: subprocess.Popen | None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def stop(self) -> None:
        """Kill the server (SIGKILL: its data is thrown away, so a graceful shutdown, which takes
        Milvus 15 s and more once collections are loaded, buys nothing), wait for it, remove its
        folder. Safe to call twice."""
        proc, self.process = self.process, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback now (picked by the OS)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _config_class():
    """The ``milvus`` package's config, plus the embedded etcd's own ports: Milvus 2.3 starts its
    embedded etcd on etcd's default ports (2379, 2380) unless ``etcd.config.path`` names an etcd
    configuration, which the package's template has no entry for, so a second server on the
    machine (another test session) would fail to start."""
    from milvus import MilvusServerConfig

    class Config(MilvusServerConfig):
        etcd_yaml = ""

        def update_extra_configs(self, content: str) -> str:
            content = super().update_extra_configs(content)
            head, sep, tail = content.partition("\netcd:\n")
            if not sep:
                raise ServerUnavailable("the 'milvus' package's configuration has no etcd section: "
                                        "use milvus==2.3.5")
            return f"{head}{sep}  config:\n    path: {self.etcd_yaml}\n{tail}"

    return Config


def _etcd_yaml(folder: Path, client_port: int, peer_port: int) -> Path:
    client, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    path = folder / "embedEtcd.yaml"
    path.write_text(f"name: default\nlisten-client-urls: {client}\nadvertise-client-urls: {client}\n"
                    f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
                    f"initial-cluster: default={peer}\n")
    return path


def _log_tail(folder: Path, lines: int = 5) -> str:
    out = []
    for name in ("milvus-stderr.log", "milvus-stdout.log"):
        f = folder / "logs" / name
        if f.is_file():
            out += [x for x in f.read_text(errors="replace").splitlines() if x.strip()][-lines:]
    return " | ".join(out[-lines:]) or "no log"


def _ready(uri: str, health_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2) as resp:
            if "OK" not in resp.read().decode("utf-8", "replace"):
                return False
    except OSError:
        return False
    from pymilvus import MilvusClient

    try:
        client = MilvusClient(uri, timeout=5)
        client.list_collections()
        client.close()
    except Exception as e:  # noqa: BLE001 - not ready yet: any client error means "try again"
        log.debug("Milvus server at %s not ready: %s", uri, e)
        return False
    return True


def _launch(folder: Path) -> tuple[LocalServer, int]:
    """Write the configuration into ``folder`` (every port a free one the OS picked), unpack the
    binary and start it; returns the server and its health-check port."""
    from milvus import MilvusServer

    config = _config_class()(data_dir=str(folder))
    keys = sorted(k for k in config.configurable_items if k.endswith("_port"))
    ports = dict(zip([*keys, "etcd_peer", "health"], _free_ports(len(keys) + 2)))
    config.update(**{k: ports[k] for k in keys})
    config.etcd_yaml = str(_etcd_yaml(folder, ports["etcd_port"], ports["etcd_peer"]))
    server = MilvusServer(config, wait_for_started=False)
    server.webservice_port = ports["health"]  # start() probes upward from here
    cwd = os.getcwd()
    try:
        server.start()  # unpacks the binary into folder/bin, writes the config, starts it
    except OSError as e:  # a binary this system cannot execute (another OS or architecture)
        raise ServerUnavailable(f"the Milvus binary of the 'milvus' package cannot run here: {e}") from None
    finally:
        os.chdir(cwd)  # MilvusServer.start changes the directory and does not restore it on failure
    local = LocalServer(f"http://127.0.0.1:{ports['proxy_port']}", ports["proxy_port"], folder, server.server_proc)
    for fd in server.proc_fds.values():  # the server writes to its own copies of the log files
        fd.close()
    server.proc_fds.clear()
    server.server_proc = None  # the package's MilvusServer.__del__ must not stop it behind our back
    return local, server.webservice_port


def start(timeout_s: float = 120.0, attempts: int = 3) -> LocalServer:
    """Start a Milvus standalone server from the ``milvus`` wheel, its files in a new temporary
    folder, its ports free ones; return once it answers (at most ``timeout_s`` seconds). A port
    taken by another program between the pick and the server's bind is retried with new ports
    (``attempts`` in all).

    Raises:
        ServerUnavailable: the server cannot run here (the reason in the message).
        RuntimeError: it exited at start (its log's last lines in the message).
        TimeoutError: it runs but was not ready in ``timeout_s`` (it is stopped and removed).
    """
    try:
        import milvus  # noqa: F401 - only: is the package there?
    except ImportError:
        raise ServerUnavailable("the 'milvus' package is not installed (pip install milvus==2.3.5, "
                                "or the kit's dev extras)") from None
    deadline, attempt = time.monotonic() + timeout_s, 0
    while True:
        attempt += 1
        folder = Path(tempfile.mkdtemp(prefix="toap-milvus-"))
        local = None
        try:
            local, health = _launch(folder)
            while not _ready(local.uri, health):
                code = local.process.poll()
                if code is not None:  # 126, 127: the loader could not run it (a library or libc missing)
                    error = ServerUnavailable if code in (126, 127) else RuntimeError
                    raise error(f"the Milvus server exited at start (code {code}): {_log_tail(folder)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the Milvus server at {local.uri} was not ready in {timeout_s:.0f} s: "
                                       f"{_log_tail(folder)}")
                time.sleep(0.2)
        except BaseException as e:
            if local is not None:
                local.stop()
            shutil.rmtree(folder, ignore_errors=True)
            if type(e) is RuntimeError and "address already in use" in str(e) and attempt < attempts:
                log.info("Milvus server: a port was taken at start, trying new ports (%s)", e)
                continue
            raise
        log.info("Milvus server %d at %s (files in %s)", local.pid, local.uri, folder)
        return local
