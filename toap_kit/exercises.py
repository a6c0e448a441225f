"""The course's checked exercises (nbgrader): a check cell calls the student's function through
``solved``, so that an unsolved stub fails with a message that says what to do, not a crash.

    from toap_kit.exercises import solved
    out = solved(project, delta, eps, floor)   # = project(delta, eps, floor)
"""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["solved"]


def solved(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; an unsolved stub (``NotImplementedError``) or any other error
    becomes an ``AssertionError`` naming the function (the original error chained)."""
    name = getattr(fn, "__name__", repr(fn))
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise AssertionError(f"exercise `{name}` is not solved yet: replace `raise NotImplementedError()` "
                             f"in the cell that defines `{name}` (just above) with your code, run it, "
                             f"then run this check again") from None
    except Exception as e:  # a bug in the answer: say where, keep the traceback
        raise AssertionError(f"`{name}{_call(args, kwargs)}` raised {type(e).__name__}: {e}") from e


def _call(args: tuple, kwargs: dict) -> str:
    """A short picture of the call's arguments for a message: ``(Tensor[2x3x8x8], 0.031, k=10)``."""
    def short(v: Any) -> str:
        shape = getattr(v, "shape", None)
        if shape is not None and hasattr(v, "dtype"):
            return f"{type(v).__name__}[{'x'.join(map(str, shape))}]"
        text = repr(v)
        return text if len(text) <= 40 else text[:37] + "..."
    return "(" + ", ".join([short(a) for a in args] + [f"{k}={short(v)}" for k, v in kwargs.items()]) + ")"
