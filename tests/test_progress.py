"""Progress readable wherever it goes: bars on a terminal, plain lines in a log, phase lines
only where asked for."""

from __future__ import annotations

import pytest

from pqd import progress


def test_plain_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys) -> None:
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    bar = progress.bar(range(3), show=True, desc="train", unit="step")
    assert isinstance(bar, progress.PlainBar)
    bar.set_postfix(loss="0.5")
    assert list(bar) == [0, 1, 2]
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("pqd: train: 3/3 step (100%), ") and err[-1].endswith("loss 0.5")
    assert len(err) == 3 and not any("\r" in line for line in err)


def test_no_line_before_the_interval_and_nothing_when_hidden(monkeypatch, capsys) -> None:
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 3600.0)
    bar = progress.bar(total=10, show=True, desc="x")
    bar.update(10)
    hidden = progress.bar(range(4), show=False, desc="y")
    assert list(hidden) == [0, 1, 2, 3]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("on", [True, False])
def test_phase_lines_only_when_shown(on: bool, capsys) -> None:
    before = progress.phases_shown()
    progress.show_phases(on)
    try:
        progress.phase("[1/2] prune: starting (1 epoch)")
    finally:
        progress.show_phases(before)
    err = capsys.readouterr().err
    assert err == ("pqd: [1/2] prune: starting (1 epoch)\n" if on else "")
    assert progress.plural(1, "epoch") == "1 epoch" and progress.plural(2, "epoch") == "2 epochs"
