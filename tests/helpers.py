"""Shared by the tests: synthetic data sets, tiny models, readers of exported ONNX weights,
and a job (recipe + data + teacher) whose stages run through the one stage loop
(:func:`pqd.engine.apply_stages`), reading like the Context a stage gets there."""

from __future__ import annotations

import copy
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from pqd.context import Context
from pqd.data import Dataset
from pqd.engine import apply_stages, stage_context
from pqd.models import build_model
from pqd.recipe import Recipe, recipe_from_dict
from pqd.state import State


@dataclass
class Job:
    """A recipe's stages on ``data`` with ``teacher``; reads like the Context of stage
    ``index`` (``job.loader``, ``job.example_input``, ``job.fit``), so a stage function can
    be called with it directly: ``apply_prune(state, job.recipe.stages[0], job)``."""

    recipe: Recipe
    data: Any
    teacher: nn.Module
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    run: Any = None
    index: int = 0

    def fresh_model(self) -> nn.Module:
        r, d = self.recipe, self.data
        return build_model(r.model.name, d.num_classes, d.mean, d.std, **r.model.kwargs)

    def settings(self) -> dict[str, Any]:
        r = self.recipe
        return {
            "train": r.train,
            "seed": r.seed,
            "augment": r.data.augment,
            "device": self.device,
            "threads": r.measure.threads,
            "progress": False,
            "fresh_model": self.fresh_model,
            "run": self.run,
        }

    @property
    def ctx(self) -> Context:
        if self.index >= len(self.recipe.stages):  # no such stage: the run's settings
            r = self.recipe
            return Context(
                data=self.data,
                device=self.device,
                teacher=self.teacher,
                train=r.train,
                seed=r.seed,
                augment=r.data.augment,
                fresh_model=self.fresh_model,
                progress=False,
            )
        return stage_context(
            self.recipe.stages, self.index, self.data, self.teacher, **self.settings()
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.ctx, name)

    def run_stages(
        self,
        state: State,
        start: int = 0,
        on_stage: Callable[[int, Any, State, float], None] | None = None,
    ) -> State:
        """Apply the recipe's stages from ``start`` to ``state`` (the pipeline's loop)."""
        return apply_stages(
            state.model,
            self.recipe.stages,
            self.data,
            self.teacher,
            state=state,
            start=start,
            on_stage=on_stage,
            **self.settings(),
        )


CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def synthetic_data(
    n_train: int = 64, n_val: int = 64, n_test: int = 32, seed: int = 0, classes: int = 10
) -> Dataset:
    """uint8 32x32 images, each a random colour plus noise (so that even an untrained net's
    predictions vary between images), with random labels (replaceable: label_with)."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        colour = torch.rand(n, 3, 1, 1, generator=g) * 255
        noise = torch.randn(n, 3, 32, 32, generator=g) * 20
        x = (colour + noise).clamp(0, 255).to(torch.uint8)
        return x, torch.randint(0, classes, (n,), generator=g)

    (tx, ty), (vx, vy), (sx, sy) = split(n_train), split(n_val), split(n_test)
    return Dataset(
        name="synthetic",
        num_classes=classes,
        classes=[str(i) for i in range(classes)],
        mean=MEAN,
        std=STD,
        train_x=tx,
        train_y=ty,
        val_x=vx,
        val_y=vy,
        test_x=sx,
        test_y=sy,
        root=Path("."),
    )


def tiny(name: str = "tiny_cnn", seed: int = 0) -> nn.Module:
    """A zoo tiny net with BN statistics from a few train-mode passes on random images."""
    torch.manual_seed(seed)
    model = build_model(name, 10, MEAN, STD)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 3, 32, 32))
    return model.eval()


def context(
    stages: list[dict[str, Any]], data: Dataset, teacher: nn.Module, model: str = "tiny_cnn"
) -> Job:
    """A job over ``data`` for a recipe with ``stages`` (batch 32, fp32, no augment); reads
    like stage 0's Context."""
    recipe = recipe_from_dict(
        {
            "model": {"name": model},
            "stages": stages,
            "data": {"augment": {"crop_padding": 0, "flip": False}},
            "train": {"batch_size": 32, "lr": 0.05, "amp": "off", "channels_last": False},
        }
    )
    return Job(recipe=recipe, data=data, teacher=teacher)


def label_with(model: nn.Module, data: Dataset) -> None:
    """Replace every split's labels with ``model``'s own predictions (float accuracy = 1)."""
    with torch.no_grad():
        model.eval()
        for split in ("train", "val", "test"):
            x = getattr(data, f"{split}_x").float() / 255.0
            setattr(data, f"{split}_y", model(x).argmax(1))


def onnx_weights(path: str | Path) -> list[dict[str, Any]]:
    """Per Conv/Gemm/ConvInteger/MatMulInteger: op, weight array (as stored, int4 widened to
    int8), stored dtype, and the DequantizeLinear scale/zero point when there is one."""
    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    out = []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "ConvInteger", "MatMulInteger"):
            continue
        name, dq = node.input[1], None
        if (
            name not in inits
            and producer.get(name) is not None
            and producer[name].op_type == "DequantizeLinear"
        ):
            dq = producer[name]
            name = dq.input[0]
        if name not in inits:
            continue
        arr = numpy_helper.to_array(inits[name])
        row = {
            "op": node.op_type,
            "node": node,
            "dtype": inits[name].data_type,
            "weight": arr.astype(np.int8) if str(arr.dtype) == "int4" else arr,
        }
        row["dequantized"] = row["weight"].astype(np.float64)
        if dq is not None:
            row["scale"] = numpy_helper.to_array(inits[dq.input[1]])
            zp = numpy_helper.to_array(inits[dq.input[2]])
            row["zero_point"] = zp.astype(np.int8) if str(zp.dtype) == "int4" else zp
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            shape = [1] * arr.ndim
            if row["scale"].ndim:
                shape[axis] = -1
            row["dequantized"] = (
                row["weight"].astype(np.float64)
                - row["zero_point"].astype(np.float64).reshape(shape)
            ) * row["scale"].astype(np.float64).reshape(shape)
        out.append(row)
    return out


def ort_logits(path: str | Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def random_images(n: int = 48, classes: int = 10, seed: int = 0) -> Dataset:
    """Random uint8 32x32 RGB images with random labels (train = n, val = test = 16)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return Dataset(
        name="synthetic",
        num_classes=classes,
        classes=[str(i) for i in range(classes)],
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        train_x=x,
        train_y=y,
        val_x=x[:16],
        val_y=y[:16],
        test_x=x[:16],
        test_y=y[:16],
        root=Path("."),
    )


def make_ctx(
    stages: list[dict[str, Any]], model: str = "tiny_resnet", **recipe: Any
) -> tuple[Job, State]:
    """A job (reads like stage 0's Context) over synthetic data and a State holding a fresh
    (seeded) model."""
    data = {
        "model": {"name": model},
        "stages": stages,
        "train": {"batch_size": 16, "lr": 0.01, "channels_last": False},
        **recipe,
    }
    r = recipe_from_dict(data)
    torch.manual_seed(0)
    ds = random_images()
    net = build_model(model, ds.num_classes, ds.mean, ds.std)
    teacher = copy.deepcopy(net).eval()
    return Job(recipe=r, data=ds, teacher=teacher), State(model=net)


def run_stages(job: Job, state: State) -> State:
    """Apply the recipe's stages in order, through the pipeline's loop."""
    return job.run_stages(state)


def fake_latency(monkeypatch: Any, noise: float = 0.0, seed: int = 0) -> dict[str, int]:
    """Replace the latency model's measurements (pieces, whole candidates) and the final
    latency panel by a MACs-based time, ``0.02 + MACs * 1e-7`` ms for networks (pieces
    ``0.01 + MACs * 1e-7``, times ``1 + noise * U(-1, 1)``), so that budgets are exact on a
    shared machine. Returns the call counts (``pieces``, ``networks``, ``panel``)."""
    import pqd.search.summary as search
    from pqd.latency_model.measure import piece_module
    from pqd.latency_model.model import LatencyModel
    from pqd.measurement.complexity import onnx_complexity
    from pqd.prune.channels import count_macs

    calls = {"pieces": 0, "networks": 0, "panel": 0}
    rng = np.random.default_rng(seed)

    def pieces(self: Any, missing: dict[str, Any]) -> dict[str, float]:
        calls["pieces"] += len(missing)
        out = {}
        for key, (lay, cin, cout) in missing.items():
            module, example = piece_module(lay, cin, cout)
            macs = count_macs(module, example[:1]) if lay.kind == "conv" else cin * cout
            out[key] = (0.01 + macs * 1e-7) * (1 + noise * rng.uniform(-1, 1))
        return out

    def networks(self: Any, candidates: dict[str, Any], panels: int) -> list[dict[str, float]]:
        calls["networks"] += len(candidates)  # (timed once: every panel times the same)
        ms = {
            n: 0.02 + count_macs(self.candidate_model(r), self.example[:1]) * 1e-7
            for n, r in candidates.items()
        }
        return [ms] * max(1, panels)

    def panel(paths: dict[str, Path], spec: Any, **_: Any) -> dict[str, dict[str, float]]:
        calls["panel"] += len(paths)
        out = {}
        for name, p in paths.items():
            ms = 0.02 + onnx_complexity(p)["macs"] * 1e-7
            out[name] = {"p50": ms, "p90": ms, "mean": ms}
        return out

    def files(self: Any, paths: dict[str, Path]) -> dict[str, float]:
        calls["panel"] += len(paths)
        return {name: 0.02 + onnx_complexity(p)["macs"] * 1e-7 for name, p in paths.items()}

    monkeypatch.setattr(LatencyModel, "time_paths", files)
    monkeypatch.setattr(LatencyModel, "_measure_pieces", pieces)
    monkeypatch.setattr(LatencyModel, "measure_panels", networks)
    monkeypatch.setattr(search, "latency_panel", panel)
    return calls


def write_image_folder(
    root: Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    *,
    size: int | None = None,
    formats: tuple[str, ...] = ("png",),
) -> list[Path]:
    """Write uint8 ``[N, 3, H, W]`` images as files ``root/<class>/<index>.<format>`` (index
    zero-padded, formats taken in turn), upscaled to ``size`` x ``size`` (bicubic) when
    given; PNG is lossless, JPEG at quality 95. Returns the paths, in image order."""
    from PIL import Image

    paths = []
    for i, (img, y) in enumerate(zip(images, labels.tolist(), strict=True)):
        pil = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy())
        if size is not None and pil.size != (size, size):
            pil = pil.resize((size, size), Image.Resampling.BICUBIC)
        fmt = formats[i % len(formats)]
        path = root / classes[y] / f"{i:05d}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        pil.save(path, quality=95) if fmt in ("jpg", "jpeg", "webp") else pil.save(path)
        paths.append(path)
    return paths


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/NAME.py`` imported as module ``bench_NAME`` (registered in
    ``sys.modules``, where dataclasses and pickling inside it look their module up)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def stopped_run(
    folder: Path,
    finished: list[str],
    stopped: tuple[str, int] | None,
    epochs: dict[str, int],
    key: str | None = None,
) -> None:
    """A run folder as a killed run leaves it: ``progress.json`` listing the ``finished``
    steps (not complete) and, with ``stopped=(step, epoch)``, that step's epoch checkpoint.
    ``epochs``: epochs by step name (e.g. ``{"00-baseline": 3, "01-quantize": 4}``); ``key``:
    also a search's ``trial.json``."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(epochs)
    recipe = {
        "baseline": {"epochs": epochs[names[0]]},
        "stages": [{"stage": n.split("-", 1)[1], "epochs": epochs[n]} for n in names[1:]],
    }
    progress = {"recipe": recipe, "complete": False, "steps": [{"step": s} for s in finished]}
    (folder / "progress.json").write_text(json.dumps(progress))
    if stopped is not None:
        (folder / "checkpoints").mkdir(exist_ok=True)
        meta = {"pqd": json.dumps({"epoch": stopped[1], "seconds": 1.0})}
        path = folder / "checkpoints" / f"{stopped[0]}.epoch.safetensors"
        save_file({"x": torch.zeros(1)}, str(path), metadata=meta)
    if key is not None:
        (folder / "trial.json").write_text(json.dumps({"key": key}))


def write_npz(path: Path) -> None:
    """A 10-class npz data set (160 train, 40 test images at 32x32) whose class shows in
    its brightness: small nets learn it in an epoch."""
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 10
        x = y[:, None, None, None] * 25 + rng.integers(0, 30, (n, 3, 32, 32))
        return x.clip(0, 255).astype(np.uint8), y.astype(np.int64)

    (tx, ty), (ex, ey) = split(160), split(40)
    np.savez(path, x_train=tx, y_train=ty, x_test=ex, y_test=ey)
