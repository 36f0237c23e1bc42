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


def readme_blocks() -> list[str]:
    """The python blocks of README's "Python API" section: data, then the pqd calls."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, "README's Python API section: a data block and a pqd block"
    return blocks


def readme_example() -> str:
    return readme_blocks()[1]


def test_readme_data_block_builds_a_model_and_tensors() -> None:
    scope: dict = {}
    exec(compile(readme_blocks()[0], "README.md", "exec"), scope)
    assert isinstance(scope["model"], nn.Sequential)
    assert scope["model"](scope["x"][:2].float() / 255).shape == (2, 2)


def test_readme_example_compresses_a_plain_sequential(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    x = torch.rand(320, 3, 16, 16)  # float images in [0, 1]
    y = (x.mean(dim=(1, 2, 3)) > 0.5).long()
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scope = {"x": x, "y": y, "model": model}
    exec(compile(readme_example(), "README.md", "exec"), scope)
    result = scope["result"]
    final = result.record["final"]
    assert result.final_onnx == Path("runs/nb/final.onnx") and result.final_onnx.is_file()
    assert final["precision"] == "int8" and 0.0 <= final["accuracy"] <= 1.0
    assert final["size_bytes"] == result.final_onnx.stat().st_size
    assert final["latency_ms"]["p50"] > 0
    assert result.record["final"]["masked_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert result.record["baseline"]["source"] == {"given": "the model passed to pqd.compress"}
    ops = {n.op_type for n in onnx.load(str(result.final_onnx)).graph.node}
    assert "QuantizeLinear" in ops or "QLinearConv" in ops
    weights = {i.data_type for i in onnx.load(str(result.final_onnx)).graph.initializer}
    assert onnx.TensorProto.INT8 in weights
    assert (tmp_path / "runs/nb/record.json").is_file()
    # the input model is not changed; apply_stages returned a QAT graph with masks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    state = scope["state"]
    assert state.quantized and sorted(state.masks) == ["0.weight", "5.weight"]
    # a second call with the same model, data and settings finds the run complete
    again = pqd.compress(
        model,
        scope["data"],
        scope["stages"],
        out="runs/nb",
        train={"batch_size": 32, "lr": 0.05},
        measure={"runtimes": ["onnxruntime"], "batch_sizes": [1], "repeats": 20},
    )
    assert again.record == result.record


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
    with pytest.raises(ValueError):
        pqd.Prune(sparsity=0.3, typo=1)


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
