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
    save_checkpoint(
        build_model("tiny_resnet", 10, [0.5] * 3, [0.25] * 3), tmp_path / "other.safetensors"
    )
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_checkpoint(tiny(), tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.safetensors")


def test_cli_refuses_a_hostile_baseline_in_one_line(
    tmp_path: Path, capsys, subset_dir: Path
) -> None:
    evil = tmp_path / "evil.pt"
    ran = tmp_path / MARKER
    evil.write_bytes(pickle.dumps(Payload(ran)))
    recipe = {
        "model": {"name": "tiny_cnn"},
        "data": {
            "root": str(subset_dir),
            "download": False,
            "limit_train": 300,
            "limit_test": 50,
            "val_size": 50,
        },
        "baseline": {"checkpoint": str(evil)},
    }
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


# ---------------------------------------------------------------- what practitioners save


def _bare(name: str = "resnet20", classes: int = 10) -> torch.nn.Module:
    """A zoo net without pqd's Classifier wrapper, as a user's training script has it."""
    return build_model(name, classes, [0.5] * 3, [0.25] * 3).net


def _save_form(form: str, sd: dict[str, torch.Tensor], tmp_path: Path) -> Path:
    if form == "plain.pt":
        torch.save(sd, tmp_path / "m.pt")
        return tmp_path / "m.pt"
    if form == "wrapped.pth":
        torch.save({"state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "m.pth")
        return tmp_path / "m.pth"
    if form == "model_state_dict.pt":
        torch.save({"model_state_dict": sd, "epoch": 3}, tmp_path / "m.pt")
        return tmp_path / "m.pt"
    if form == "model.bin":
        torch.save({"model": sd}, tmp_path / "pytorch_model.bin")
        return tmp_path / "pytorch_model.bin"
    if form == "ddp.pt":
        torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "m.pt")
        return tmp_path / "m.pt"
    if form == "compiled.pt":
        torch.save({f"_orig_mod.{k}": v for k, v in sd.items()}, tmp_path / "m.pt")
        return tmp_path / "m.pt"
    if form == "lightning.ckpt":
        torch.save(
            {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3},
            tmp_path / "m.ckpt",
        )
        return tmp_path / "m.ckpt"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    return tmp_path / "m.safetensors"


FORMS = [
    "plain.pt",
    "wrapped.pth",
    "model_state_dict.pt",
    "model.bin",
    "ddp.pt",
    "compiled.pt",
    "lightning.ckpt",
    "save_file.safetensors",
]


@pytest.mark.parametrize("form", FORMS)
def test_a_plain_state_dict_loads_in_every_usual_form(tmp_path: Path, form: str) -> None:
    src = _bare()
    torch.nn.init.normal_(src.classifier[2].weight)  # not what a fresh model holds
    path = _save_form(form, src.state_dict(), tmp_path)
    model = build_model("resnet20", 10, [0.4] * 3, [0.2] * 3)
    load_checkpoint(model, path)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[f"net.{k}"], v), k
    assert torch.equal(model.norm.mean.flatten(), torch.tensor([0.4] * 3))  # from the data


def test_a_user_model_state_dict_loads(tmp_path: Path) -> None:
    from pqd.models import Classifier

    def user_net() -> torch.nn.Module:  # its own submodule is called "net" too
        net = torch.nn.Sequential()
        net.add_module("net", torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()))
        net.add_module("pool", torch.nn.AdaptiveAvgPool2d(1))
        net.add_module("flat", torch.nn.Flatten())
        net.add_module("fc", torch.nn.Linear(8, 10))
        return net

    src = user_net()
    torch.save(src.state_dict(), tmp_path / "user.pt")
    model = Classifier(user_net(), [0.5] * 3, [0.25] * 3)
    load_checkpoint(model, tmp_path / "user.pt")
    assert torch.equal(model.net.fc.weight, src.fc.weight)
    assert torch.equal(model.net.net[0].weight, src.net[0].weight)


def test_pqd_full_form_still_loads_also_under_ddp(tmp_path: Path) -> None:
    a = tiny()
    sd = {f"module.{k}": v for k, v in a.state_dict().items()}
    torch.save(sd, tmp_path / "full.pt")
    b = tiny()
    load_checkpoint(b, tmp_path / "full.pt")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


def test_a_class_count_mismatch_is_named_as_a_shape(tmp_path: Path) -> None:
    torch.save(_bare("resnet20", 100).state_dict(), tmp_path / "c100.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(build_model("resnet20", 10, [0.5] * 3, [0.25] * 3), tmp_path / "c100.pt")
    line = err.value.line()
    assert "\n" not in line
    assert "net.classifier.2.weight is 100x64 in the checkpoint, 10x64 in the model" in line
    assert "missing" not in line and "not in the model" not in line
    assert "classes" in err.value.fix


def test_other_architecture_names_first_missing_and_unexpected(tmp_path: Path) -> None:
    torch.save(_bare("tiny_resnet").state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(build_model("resnet20", 10, [0.5] * 3, [0.25] * 3), tmp_path / "other.pt")
    line = err.value.line()
    assert "\n" not in line and "model.name" in line
    own = list(build_model("resnet20", 10, [0.5] * 3, [0.25] * 3).state_dict())
    theirs = [f"net.{k}" for k in _bare("tiny_resnet").state_dict()]
    first_missing = next(k for k in own if k not in theirs and not k.startswith("norm."))
    first_unexpected = next(k for k in theirs if k not in own)
    assert f"missing from the checkpoint (first: {first_missing})" in line
    assert f"not in the model (first: {first_unexpected})" in line


def test_a_pickled_whole_model_is_refused_in_our_own_words(tmp_path: Path) -> None:
    torch.save(tiny(), tmp_path / "whole.pt")
    with pytest.raises(CheckpointError) as err:
        read_state_dict(tmp_path / "whole.pt")
    line = err.value.line()
    assert "\x1b" not in line and "\n" not in line
    assert "refusing checkpoint" in line and "pqd.models.Classifier" in line
    assert "state_dict()" in err.value.fix and "weights_only" not in line


def test_a_dict_without_tensors_names_what_it_holds(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "weights": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="keys epoch, weights"):
        read_state_dict(tmp_path / "odd.pt")
