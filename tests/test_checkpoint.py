"""Checkpoints: safetensors round trip; hostile, corrupt and mismatched files are refused
with one line, and a pickle payload never runs."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import yaml

from pqd.checkpoint import load_checkpoint, read_state_dict, save_checkpoint
from pqd.cli import main
from pqd.errors import CheckpointError
from pqd.models import build_model

MARKER = "pqd-test-payload-ran"


class Payload:
    """Unpickling this calls ``open(path, 'w')``: a file appears if the payload runs."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def tiny() -> torch.nn.Module:
    return build_model("tiny_cnn", 10, [0.5] * 3, [0.25] * 3)


def test_round_trip(tmp_path: Path) -> None:
    a, b = tiny(), tiny()
    save_checkpoint(a, tmp_path / "m.safetensors", {"note": "x"})
    load_checkpoint(b, tmp_path / "m.safetensors")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    torch.save(a.state_dict(), tmp_path / "m.pt")  # a plain weights-only .pt loads too
    load_checkpoint(tiny(), tmp_path / "m.pt")


def test_hostile_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    ran = tmp_path / MARKER
    with evil.open("wb") as f:
        pickle.dump({"net.weight": Payload(ran)}, f)
    with pytest.raises(CheckpointError, match="refusing checkpoint"):
        read_state_dict(evil)
    assert not ran.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x80\x04garbage"])
def test_corrupt_files(tmp_path: Path, content: bytes) -> None:
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as err:
            read_state_dict(path)
        assert "\n" not in err.value.line()


def test_mismatch_and_missing(tmp_path: Path) -> None:
    save_checkpoint(build_model("tiny_resnet", 10, [0.5] * 3, [0.25] * 3),
                    tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_checkpoint(tiny(), tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.safetensors")


def test_cli_refuses_a_hostile_baseline_in_one_line(tmp_path: Path, capsys,
                                                    subset_dir: Path) -> None:
    evil = tmp_path / "evil.pt"
    ran = tmp_path / MARKER
    evil.write_bytes(pickle.dumps(Payload(ran)))
    recipe = {"model": {"name": "tiny_cnn"},
              "data": {"root": str(subset_dir), "download": False, "limit_train": 300,
                       "limit_test": 50, "val_size": 50},
              "baseline": {"checkpoint": str(evil)}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pqd: error: refusing checkpoint")
    assert not ran.exists()


def test_atomic_write_gives_the_usual_file_mode(tmp_path: Path) -> None:
    import os

    from pqd.checkpoint import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
