"""Progress of long work, readable wherever it is written: a tqdm bar on a terminal, a plain
line every :data:`PLAIN_EVERY_S` seconds when stderr is a file or a pipe (a log holds lines,
not one huge line of carriage returns), and phase lines (what pqd is doing and how far: a
stage starting, an epoch finished, files being measured) that the ``pqd`` command prints
even with ``--no-progress``.

Every bar in pqd comes from :func:`bar`; every phase line from :func:`phase`. Phase lines are
off in the Python API unless :func:`show_phases` turns them on (the command does).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

PLAIN_EVERY_S = 30.0
"""Seconds between two plain progress lines when stderr is not a terminal."""

_state = {"phases": False}


def show_phases(on: bool = True) -> None:
    """Print phase lines (the ``pqd`` command turns them on; the Python API leaves them off).

    Args:
        on: print them (True) or not.
    """
    _state["phases"] = on


def phases_shown() -> bool:
    """Whether phase lines are printed."""
    return _state["phases"]


def phase(message: str) -> None:
    """One phase line on stderr (``pqd: <message>``), when phase lines are on.

    Args:
        message: what pqd is doing and how far, e.g. ``[2/3] quantize: epoch 1/4 ...``.
    """
    if _state["phases"]:
        print(f"pqd: {message}", file=sys.stderr, flush=True)


def plural(n: int, word: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def on_terminal() -> bool:
    """Whether stderr is a terminal (bars redraw in place there)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class PlainBar:
    """The part of tqdm's interface pqd uses, writing a plain line every
    :data:`PLAIN_EVERY_S` seconds instead of redrawing a bar."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        **_: Any,
    ) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.n = initial
        self.desc = desc
        self.unit = unit
        self.postfix = ""
        self.t0 = self.last = time.monotonic()

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= PLAIN_EVERY_S:
            self.last = now
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        """``pqd: <desc>: <n>/<total> <unit> (<percent>), <seconds> s[, postfix]``."""
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        return (
            f"pqd: {self.desc}: {done} {self.unit}{share}, "
            f"{time.monotonic() - self.t0:.0f} s{self.postfix}"
        )

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = "".join(f", {k} {v}" for k, v in items.items())

    def close(self) -> None:
        pass


def bar(
    iterable: Iterable[Any] | None = None, *, show: bool, **kwargs: Any
) -> tqdm[Any] | PlainBar:
    """A progress bar: tqdm on a terminal, a :class:`PlainBar` when stderr is not one,
    nothing visible when ``show`` is False.

    Args:
        iterable: what to iterate over (or None, and call ``update``).
        show: show progress at all (the ``progress`` flags, ``--no-progress``).
        **kwargs: tqdm's ``total``, ``desc``, ``unit``, ``initial``, ``leave``, ...

    Returns:
        The bar (iterate it, or ``update``/``close`` it).
    """
    if show and not on_terminal():
        return PlainBar(iterable, **kwargs)
    return tqdm(iterable, disable=not show, **kwargs)
