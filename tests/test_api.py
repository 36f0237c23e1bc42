"""The Python API: README's example runs as written on a plain nn.Sequential and tensors."""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn as nn

import pqd
from pqd.engine import as_specs

README = Path(__file__).resolve().parents[1] / "README.md"
API_PAGE = README.parent / "docs" / "python-api.md"


def readme_blocks() -> list[str]:
    """The python blocks of README's "Python API" section: data, then the pqd calls."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, "README's Python API section: a data block and a pqd block"
    return blocks


def readme_example() -> str:
    return readme_blocks()[1]


def test_readme_data_block_builds_a_trained_model_and_loaders() -> None:
    scope: dict = {}
    exec(compile(readme_blocks()[0], "README.md", "exec"), scope)
    assert isinstance(scope["model"], nn.Sequential)
    x, _ = next(iter(scope["test_loader"]))
    assert x.min() < 0  # normalised floats, as ToTensor + Normalize give them
    assert scope["model"](x).shape == (64, 2)


@pytest.mark.integration
def test_readme_example_compresses_a_dataloader_model_and_hands_it_back(
    tmp_path: Path, monkeypatch
) -> None:
    """The notebook path: DataLoaders of normalised images, prune -> PTQ -> distill, the
    INT8 torch module evaluated in torch, the file measured again: all agree."""
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_blocks()[0], "README.md", "exec"), scope)
    model = scope["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exec(compile(readme_example(), "README.md", "exec"), scope)
    result = scope["result"]
    final = result.record["final"]
    assert result.final_onnx == Path("runs/nb/final.onnx") and result.final_onnx.is_file()
    assert final["precision"] == "int8" and final["test_images"] == 64
    assert final["size_bytes"] == result.final_onnx.stat().st_size
    assert final["masked_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert result.record["baseline"]["source"] == {"given": "the model passed to pqd.compress"}
    # PTQ as written: no epochs, calibrated on the validation split; fine-tuning defaults
    quantize = result.record["stages"][1]
    assert quantize["config"]["epochs"] == 0 and quantize["info"]["calibration_split"] == "val"
    assert result.record["recipe"]["train"]["lr"] == pqd.api.FINE_TUNE["lr"]
    weights = {i.data_type for i in onnx.load(str(result.final_onnx)).graph.initializer}
    assert onnx.TensorProto.INT8 in weights
    # the model handed back: INT8 ops, .eval() works, it takes the user's normalised inputs
    assert result.model.quantized and not result.model.training
    assert scope["hits"] / 64 == pytest.approx(final["torch_accuracy"], abs=1 / 64)
    assert pqd.measure(result.final_onnx, result.data)["accuracy"] == final["accuracy"]
    test = {"test": scope["test_loader"], "mean": scope["MEAN"], "std": scope["STD"]}
    again = pqd.measure(
        result.final_onnx,
        test,
        reference=result.state,
        batch_sizes=[1],
        spec={"runtimes": ["onnxruntime"], "repeats": 5},
    )
    assert again["accuracy"] == final["accuracy"] and again["size_bytes"] == final["size_bytes"]
    assert again["parity"]["top1_agreement"] == final["parity"]["top1_agreement"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the same call again returns the finished run
    again_run = pqd.compress(
        model,
        scope["data"],
        scope["stages"],
        out="runs/nb",
        measure={"runtimes": ["onnxruntime"], "batch_sizes": [1], "repeats": 20},
    )
    assert again_run.record == result.record


@pytest.mark.integration
def test_every_python_block_of_the_api_page_runs(tmp_path: Path, monkeypatch) -> None:
    """docs/python-api.md's blocks, in order, after the README's data block (as the page
    says): they run as written, and what they print holds."""
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", API_PAGE.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 4
    scope: dict = {}
    exec(compile(readme_blocks()[0], "README.md", "exec"), scope)
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/python-api.md block {i + 1}", "exec"), scope)
    assert scope["result"].record["final"]["precision"] == "int8"
    assert scope["entry"]["parity"]["top1_agreement"] >= 0.9
    assert scope["path"] == Path("runs/api/ptq.onnx")
    info = scope["ptq"].record["stages"][0]["info"]
    assert info["calibration_split"] == "forward_loop" and info["calibration_images"] == 256


def test_stage_configs_are_the_recipe_specs() -> None:
    from pqd.recipe import DistillSpec, EarlyExitSpec, PruneChannelsSpec, PruneSpec, QuantizeSpec

    assert (pqd.Prune, pqd.PruneChannels, pqd.Quantize, pqd.Distill, pqd.EarlyExit) == (
        PruneSpec,
        PruneChannelsSpec,
        QuantizeSpec,
        DistillSpec,
        EarlyExitSpec,
    )
    assert pqd.Prune(sparsity=0.3) == as_specs([{"stage": "prune", "sparsity": 0.3}])[0]
    from pqd.errors import SpecError

    with pytest.raises(
        SpecError, match=r"^Prune: unknown key 'epochz' \(did you mean 'epochs'\?\)"
    ):
        pqd.Prune(sparsity=0.3, epochz=1)  # one line, as a recipe's typo gets
    with pytest.raises(ValueError, match="sparsity: Input should be less than 1"):
        pqd.Prune(sparsity=1.5)


def test_from_tensors_takes_a_torch_dataset_and_float_images() -> None:
    torch.manual_seed(0)
    x = torch.rand(40, 3, 8, 8)
    y = torch.arange(40) % 4
    ds = torch.utils.data.TensorDataset(x, y)
    data = pqd.data.from_tensors(train=ds, test=(x[:8], y[:8]), val_size=8)
    assert data.train_x.dtype == torch.uint8 and len(data.val_y) == 8
    assert len(data.train_y) == 32 and data.num_classes == 4
    assert data.mean == (0.0, 0.0, 0.0) and data.std == (1.0, 1.0, 1.0)
    assert torch.equal(data.test_x, (x[:8] * 255).round().to(torch.uint8))
    from pqd.errors import DataError

    with pytest.raises(DataError, match="not \\[0, 1\\]"):
        pqd.data.from_tensors(train=(x * 3, y))


def _toy(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 8, 8), generator=g) / 255
    y = (x.mean(dim=(1, 2, 3)) > 0.5).long()
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip
    return x, y, model


def test_from_tensors_reads_dataloaders_and_undoes_normalisation() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from pqd.errors import DataError

    x, y, _ = _toy()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    loader = DataLoader(TensorDataset((x - m) / s, y), batch_size=10, shuffle=True)
    data = pqd.data.from_tensors(train=loader, test=loader, mean=mean, std=std, val_size=0)
    want = (x * 255).round().to(torch.uint8)
    order = torch.argsort(data.test_x.float().flatten(1).sum(1) + data.test_y * 1e6)
    ref = torch.argsort(want.float().flatten(1).sum(1) + y * 1e6)
    assert torch.equal(data.test_x[order], want[ref])  # the same images, back to uint8
    assert data.mean == mean and len(data.train_y) == 96
    # [0, 1] images with mean/std stay as they are (normalised only when they leave [0, 1])
    assert torch.equal(pqd.data.from_tensors(train=(x, y), mean=mean, std=std, val_size=0).train_x,
                       want)  # fmt: skip
    with pytest.raises(DataError, match="2/2 values for 3 channels"):
        pqd.data.from_tensors(train=((x - m) / s, y), mean=(0.5, 0.5), std=(0.2, 0.2))
    with pytest.raises(DataError, match="DataLoader yields"):
        pqd.data.from_tensors(train=DataLoader(x, batch_size=8))
    with pytest.raises(DataError, match="did you mean 'test'"):
        pqd.data.as_dataset({"train": (x, y), "tset": (x, y)})


def test_compress_without_a_test_split_says_so_in_one_line(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from pqd.errors import DataError

    x, y, model = _toy()
    for data in (DataLoader(TensorDataset(x, y), batch_size=16), TensorDataset(x, y)):
        with pytest.raises(DataError, match="test split, which is empty"):
            pqd.compress(model, data, [], out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_ptq_as_written_trains_no_epochs() -> None:
    assert pqd.Quantize(mode="ptq").epochs == 0
    assert as_specs([{"stage": "quantize", "mode": "ptq"}])[0].epochs == 0
    assert pqd.Quantize().epochs == 2  # QAT keeps the stages' default
    with pytest.raises(ValueError, match="set epochs: 0"):
        pqd.Quantize(mode="ptq", epochs=2)


def test_forward_loop_calibrates_with_the_users_batches_in_the_users_format() -> None:
    """The loop gets a model that takes what the user's model takes (normalised images):
    with fake-quant off during calibration it computes what the user's model computes."""
    x, y, _ = _toy()
    torch.manual_seed(0)  # no BN: the stage's BN-statistics refresh leaves it as it is
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 2),
    ).eval()  # fmt: skip
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    normed = (x - 0.5) / 0.25
    seen: list[torch.Tensor] = []

    def loop(m: nn.Module) -> None:
        for batch in normed[:40].split(20):
            out = m(batch)
            seen.append((out - model(batch)).abs().max())

    from pqd.api import _as_given
    from pqd.data import from_tensors
    from pqd.engine import wrap

    data = from_tensors(train=(normed, y), mean=mean, std=std, val_size=16)
    net = wrap(model, data)
    state = pqd.apply_stages(net, [pqd.Quantize(mode="ptq")], data,
                             forward_loop=_as_given(loop, mean, std))  # fmt: skip
    assert state.quantized and len(seen) == 2 and max(seen) < 1e-4
    assert state.info["calibration_split"] == "forward_loop"
    assert state.info["calibration_images"] == 40


def test_export_measure_and_torch_model_of_a_state(tmp_path: Path) -> None:
    """pqd.export writes the INT8 file of a state; pqd.torch_model is the torch module it
    reproduces (.eval() works on the converted graph); pqd.measure reports it as the
    record would, parity included."""
    x, y, model = _toy()
    data = {"train": (x[:64], y[:64]), "test": (x[64:], y[64:])}
    state = pqd.apply_stages(model, [pqd.Quantize(mode="ptq", calibration_batches=2)], data,
                             train={"batch_size": 16})  # fmt: skip
    path = pqd.export(state, tmp_path / "m.onnx", x[:1])
    assert path.is_file()
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(path)).graph.node}
    net = pqd.torch_model(state).eval()
    assert net.quantized and not net.training
    with torch.no_grad():
        torch_acc = float((net(x[64:]).argmax(1) == y[64:]).float().mean())
    entry = pqd.measure(path, (x[64:], y[64:]), reference=state, runtimes=["onnxruntime"],
                        spec={"repeats": 5})  # fmt: skip
    assert entry["test_images"] == 32 and entry["size_bytes"] == path.stat().st_size
    assert entry["torch_accuracy"] == pytest.approx(torch_acc)
    assert entry["parity"]["top1_agreement"] >= 0.9
    lo, hi = entry["accuracy_ci"]
    assert lo <= entry["accuracy"] <= hi
    no_ref = pqd.measure(path, (x[64:], y[64:]), spec={"repeats": 5})
    assert "parity" not in no_ref and no_ref["accuracy"] == entry["accuracy"]
    from pqd.errors import PqdError

    with pytest.raises(PqdError, match="does not exist"):
        pqd.measure(tmp_path / "none.onnx", (x, y))


def test_out_none_reuses_its_folder_and_changed_inputs_are_named(tmp_path: Path) -> None:
    from pqd.resume import RunFolderError

    x, y, model = _toy()
    data = {"train": (x[:64], y[:64]), "test": (x[64:], y[64:])}
    settings = {"measure": {"runtimes": ["onnxruntime"], "batch_sizes": [1], "repeats": 5}}
    first = pqd.compress(model, data, [], **settings)
    assert first.run_dir.is_dir() and first.run_dir.name.startswith("compress-")
    again = pqd.compress(model, data, [], **settings)
    assert again.run_dir == first.run_dir and again.record == first.record
    assert not again.model.quantized  # no stage: the float baseline
    other = {"train": (x[:64], 1 - y[:64]), "test": (x[64:], y[64:])}
    with pytest.raises(RunFolderError, match=r"data_sha256.*fix: pass another out=, or fresh"):
        pqd.compress(model, other, [], out=first.run_dir, **settings)


@pytest.mark.slow
def test_import_pqd_changes_no_global_warning_or_logging_state() -> None:
    import subprocess
    import sys

    code = (
        "import logging, warnings\n"
        "import numpy, torch, torchao  # their own import-time filters come first\n"
        "def snap():\n"
        "    return (list(warnings.filters), {n: list(logging.getLogger(n).filters) "
        "for n in ('torchao', 'torch', 'torch.utils._pytree')},\n"
        "            logging.getLogger('torch').level, logging.getLogger('torchao').level)\n"
        "before = snap()\n"
        "import pqd\n"
        "pqd.Prune(sparsity=0.5)\n"
        "x = torch.rand(4, 3, 8, 8)\n"
        "pqd.data.from_tensors(train=(x, torch.tensor([0, 1, 0, 1])), val_size=0)\n"
        "assert snap() == before, (snap(), before)\n"
        "print('same')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "same" in out.stdout, out.stderr[-2000:]


def test_baseline_takes_dicts_and_device_names() -> None:
    x, y, model = _toy()
    trained = pqd.baseline(model, {"train": (x, y)}, train={"batch_size": 32, "lr": 0.05},
                           epochs=1, device="cpu")  # fmt: skip
    assert trained is model
