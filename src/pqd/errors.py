"""User-facing errors: one line naming the problem and the fix.

The CLI prints ``pqd: error: <message>`` for any :class:`PqdError` and exits with
status 2, without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class PqdError(Exception):
    """A problem with the user's input or environment that the user can fix.

    ``problem`` says what is wrong, ``fix`` says what to do about it; together
    they print as one line.
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        text = self.problem if not self.fix else f"{self.problem}; fix: {self.fix}"
        return " ".join(text.split())  # one line, whatever the parts held


class RecipeError(PqdError):
    """The recipe (YAML or overrides) is malformed or has impossible values."""


class SpecError(RecipeError, ValueError):
    """A stage config or recipe section built in Python (``pqd.Prune(...)``) with an unknown
    key, a wrong type or an impossible value: one line, with the closest valid key."""


class DataError(PqdError):
    """A data set is missing, corrupt, or in the wrong layout."""


class ModelError(PqdError):
    """A model name is unknown, cannot be built, or does not fit the data."""


class CheckpointError(PqdError):
    """A checkpoint is missing, corrupt, unsafe, or does not match the model."""


class DataRootError(DataError):
    """The data folder does not hold the data set (missing, or another layout).

    The right fix depends on where the folder was named (``--data-dir``, ``data.root=`` on
    the command line, the recipe, ``PQD_DATA_DIR``), which only the caller knows:
    :meth:`pqd.data.DataRoot.explain` rewrites the line with it. ``holding`` says what the
    folder must hold; ``hint`` is a further way out kept in every version (a download).
    """

    def __init__(
        self, problem: str, fix: str | None = None, *, holding: str, hint: str | None = None
    ) -> None:
        self.holding = holding
        self.hint = hint
        super().__init__(problem, fix)


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` with the valid names closest to a wrong one (difflib), or
    "" when none is close: appended to an "unknown ..." problem."""
    import difflib

    close = difflib.get_close_matches(str(word), list(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    names = [repr(c) for c in close]
    shown = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return f" (did you mean {shown}?)"
