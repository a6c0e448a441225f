"""``toap`` run in a child process as a user runs it, and judged (issue 28; ``odd_crawl`` uses it).

``spawn``/``finish``/``toap`` run ``python -m toap_kit.cli ARGS`` with one thread, a strict UTF-8
stdout as a desktop locale has, and a time limit; ``Call.crash`` tells a traceback, an internal
error, a UnicodeError or a death by signal from a clear error; ``refusal`` and ``unfinished``
judge a call that must be refused or must run to its end.

Permission cases need permissions that hold: as root, the children run without the capabilities
that pass over them (``setpriv``, ``restricted``), so a read-only folder is read-only to them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

__all__ = ["CALL_LIMIT_S", "Call", "Child", "finish", "permissions_hold", "refusal", "restricted", "spawn", "toap",
           "unfinished"]

CALL_LIMIT_S = 300
"""A ``toap`` call still running after this many seconds is a hang."""
_DROP = "-dac_override,-dac_read_search,-fowner"  # the capabilities by which root passes over permissions
_CRASH_SIGNS = ("Traceback (most recent call last)", "internal error", "run with --debug for the traceback",
                "UnicodeEncodeError", "UnicodeDecodeError")


def restricted() -> list[str]:
    """The command prefix that makes a child obey file permissions: for root, ``setpriv``
    without the capabilities that pass over them; for anyone else, nothing."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return []
    return ["setpriv", f"--inh-caps={_DROP}", f"--bounding-set={_DROP}", "--"]


def permissions_hold() -> bool:
    """Whether a ``restricted`` child is refused a folder without write permission (False for
    root without ``setpriv``, or where dropping capabilities is not allowed)."""
    if os.geteuid() != 0:
        return True
    if not restricted():
        return False
    return subprocess.run([*restricted(), "true"], capture_output=True).returncode == 0


@dataclass
class Call:
    """One ``toap`` run in a child process: exit code (None: killed at the time limit), output."""

    args: list[str]
    rc: int | None
    out: str
    err: str
    seconds: float

    @property
    def hung(self) -> bool:
        return self.rc is None

    def crash(self) -> str | None:
        """Why this looks like a crash (a traceback, an internal error, a death by signal), or None."""
        if self.hung:
            return None
        text = self.out + self.err
        for sign in _CRASH_SIGNS:
            if sign in text:
                line = next((x for x in text.splitlines() if sign in x), sign)
                return line.strip()[:300]
        return None if self.rc in (0, 1, 2) else f"exit code {self.rc}"

    def error_line(self) -> str:
        lines = [x for x in self.err.splitlines() if x.strip()]
        return lines[-1] if lines else ""

    def json(self) -> dict | None:
        try:
            doc = json.loads(self.out)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None


@dataclass
class Child:
    """A ``toap`` run started by ``spawn``."""

    process: subprocess.Popen
    argv: list[str]
    started: float

    @property
    def pid(self) -> int:
        return self.process.pid


def spawn(*args: str | os.PathLike, env: dict | None = None) -> Child:
    """Start ``python -m toap_kit.cli ARGS`` in a child process (``restricted``, one thread, a
    strict UTF-8 stdout as a desktop locale has); ``finish`` waits for it."""
    argv = [os.fsdecode(a) for a in args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8:strict", **(env or {})}
    process = subprocess.Popen([*restricted(), sys.executable, "-m", "toap_kit.cli", *argv], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    return Child(process, argv, time.perf_counter())


def finish(child: Child, limit_s: float = CALL_LIMIT_S) -> Call:
    """Wait for a ``spawn``ed child, at most ``limit_s`` seconds from its start (then it is
    killed, and its ``Call`` has ``rc`` None)."""
    try:
        out, err = child.process.communicate(timeout=max(0.1, limit_s - (time.perf_counter() - child.started)))
        rc = child.process.returncode
    except subprocess.TimeoutExpired:
        child.process.kill()
        out, err = child.process.communicate()
        rc = None
    return Call(child.argv, rc, out.decode("utf-8", "backslashreplace"), err.decode("utf-8", "backslashreplace"),
                time.perf_counter() - child.started)


def toap(*args: str | os.PathLike, limit_s: float = CALL_LIMIT_S, env: dict | None = None) -> Call:
    """``toap ARGS`` in a child process (``spawn``), waited for (``finish``)."""
    return finish(spawn(*args, env=env), limit_s)


def refusal(call: Call, says: str) -> tuple[str, str]:
    """A call that must be refused: one line on stderr saying ``says``, exit 1 (2: bad arguments)."""
    if call.hung:
        return "hang", f"still running after {call.seconds:.0f} s"
    crash = call.crash()
    if crash:
        return "crash", crash
    if call.rc == 0:
        return "silently_wrong", f"accepted (exit 0): {call.out.strip()[:200]}"
    lines = [x for x in call.err.splitlines() if x.strip()]
    line = call.error_line()
    if call.rc in (1, 2) and len(lines) == 1 and "error: " in line and says in line:
        return "clear_error", line
    return "unexpected", f"exit {call.rc}: {line[:200]!r} (should say {says!r} in one line)"


def unfinished(call: Call) -> tuple[str, str] | None:
    """The outcome of a call that should have run to its end, if it did not (hang, crash, no JSON)."""
    if call.hung:
        return "hang", f"still running after {call.seconds:.0f} s"
    if call.crash():
        return "crash", call.crash()
    if call.rc not in (0, 1) or ("--json" in call.args and call.json() is None):
        return "unexpected", f"exit {call.rc}: {call.error_line()[:200]!r}"
    return None
