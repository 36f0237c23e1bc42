"""What a training epoch of each step costs, against the machine's own peak, in one run.

    python benchmarks/train_speed.py                       # fastnet_q8, resnet18, vit_small
    python benchmarks/train_speed.py --models fastnet_q8 --batches 10
    python benchmarks/train_speed.py --render              # page from the stored JSON

For each model at 32 px (batch ``--batch``, 2 threads unless ``--threads``), images/s of
pqd's own training loop (:func:`pqd.train.fit`) over ``--batches`` fixed batches of real
CIFAR-10 images, per step kind:

- ``float``: the baseline's and the prune stage's training (bf16 autocast + channels_last
  where the CPU has native bf16, ``amp: auto``);
- ``prune``: the same with 50% masks re-applied after every step;
- ``qat fp32 graph``: the PT2E QAT graph as pqd trained it before the fast views (fp32, BN
  and observers live): the reference the speed-up is measured against;
- ``qat``: the QAT graph as the quantize stage trains it now: the first 10% of steps through
  the cast view (bf16 convs, BN and observers live), the rest frozen (the folded conv);
- ``qat frozen``: the frozen view alone (what every later stage trains);
- ``distill``: the frozen QAT graph with the KD loss against the float teacher.

Beside them, the peak of this CPU measured in the same run: a 2048^3 matmul forward and
backward in fp32 and in bf16 (GFLOP/s); each step's ``of peak`` is its training FLOPs per
second (torch's FLOP counter over one step, forward and backward) over the peak of the
precision its convs run in. Also the loader: one epoch of :class:`pqd.data.Loader` with the
training augmentation over the same images, images/s (the loader is not the bottleneck
while it is above every training column).

Writes ``docs/results/train_speed.json`` and renders ``docs/results/train_speed.md`` from it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
JSON_PATH = ROOT / "docs" / "results" / "train_speed.json"
PAGE_PATH = ROOT / "docs" / "results" / "train_speed.md"
STEPS = ("float", "prune", "qat fp32 graph", "qat", "qat frozen", "distill")


def peak_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Matmul forward + backward (3 matmuls of n^3) GFLOP/s in ``dtype``."""
    a = torch.randn(n, n, dtype=dtype, requires_grad=True)
    b = torch.randn(n, n, dtype=dtype, requires_grad=True)
    for _ in range(2):
        (a @ b).sum().backward()
    t = time.perf_counter()
    for _ in range(reps):
        (a @ b).sum().backward()
    dt = (time.perf_counter() - t) / reps
    return 3 * 2 * n**3 / dt / 1e9


class Batches:
    """A fixed list of batches that :func:`pqd.train.fit` can iterate."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def step_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one training step (forward + backward) of an eager model on ``x``."""
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model)
    with FlopCounterMode(display=False) as counter:
        m(x).sum().backward()
    return int(counter.get_total_flops())


def fit_seconds(model: nn.Module, batches: Batches, cfg: Any, **kw: Any) -> float:
    """Seconds of one :func:`pqd.train.fit` epoch over ``batches``."""
    from pqd.train import fit

    t = time.perf_counter()
    fit(model, batches, cfg, 1, device=torch.device("cpu"), progress=False, **kw)
    return time.perf_counter() - t


def measure_model(name: str, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Images/s per step kind of one zoo model (see the module doc): every step kind is set
    up first, warmed up on 2 batches, then timed in ``args.rounds`` interleaved rounds (one
    epoch over the batches per kind and round); the median round counts, the spread is
    (max - min) / median."""
    from pqd.models import build_model
    from pqd.prune.masks import magnitude_masks, prunable_parameters
    from pqd.quant.prepare import prepare_qat
    from pqd.quant.qat_train import freeze, qat_steps
    from pqd.recipe import TrainSpec
    from pqd.state import MaskKeeper
    from pqd.train import autocast_dtype, kd_loss

    torch.manual_seed(0)
    xs = data.train_x[: args.batch * args.batches].float() / 255  # what pqd's Loader yields
    ys = data.train_y[: args.batch * args.batches]
    batches = Batches(
        [(xs[i : i + args.batch], ys[i : i + args.batch]) for i in range(0, len(ys), args.batch)]
    )
    cfg = TrainSpec(lr=0.01, label_smoothing=0.1, max_grad_norm=None)
    model = build_model(name, 10, data.mean, data.std)
    bf16 = autocast_dtype("auto", model, torch.device("cpu")) == torch.bfloat16
    flops = step_flops(model, xs[: args.batch]) / args.batch  # per image
    example = xs[:2]
    pruned = copy.deepcopy(model)
    keep = MaskKeeper(pruned, magnitude_masks(prunable_parameters(pruned), 0.5))
    graph = prepare_qat(copy.deepcopy(model), example)
    fast = prepare_qat(copy.deepcopy(model), example)
    frozen = prepare_qat(copy.deepcopy(model), example)
    freeze(frozen)
    teacher = copy.deepcopy(model).eval()
    kd = kd_loss(teacher, 4.0, 0.9, 0.0, device=torch.device("cpu"))
    kinds: dict[str, tuple[nn.Module, dict[str, Any], bool]] = {
        "float": (copy.deepcopy(model), {}, bf16),
        "prune": (pruned, {"after_step": keep}, bf16),
        "qat fp32 graph": (graph, {}, False),
        # a fresh copy of the unfrozen graph every round: 10% live, then frozen
        "qat": (fast, {}, bf16),
        "qat frozen": (frozen, {"steps": qat_steps(frozen, None)}, bf16),
        "distill": (frozen, {"steps": qat_steps(frozen, None), "loss_fn": kd}, bf16),
    }

    def runner(kind: str) -> tuple[nn.Module, dict[str, Any]]:
        net, kw, _ = kinds[kind]
        if kind == "qat":
            net = copy.deepcopy(fast)
            kw = {"steps": qat_steps(net, 0.1)}
        return net, kw

    warm = Batches(batches.batches[:2])
    for kind in kinds:
        net, kw = runner(kind)
        fit_seconds(net, warm, cfg, **kw)
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            net, kw = runner(kind)
            seconds[kind].append(fit_seconds(net, batches, cfg, **kw))
    images = sum(len(y) for _, y in batches.batches)
    out: dict[str, Any] = {"model": name, "train_flops_per_image": flops, "bf16": bf16, "steps": {}}
    for kind, (_, _, in_bf16) in kinds.items():
        med = statistics.median(seconds[kind])
        out["steps"][kind] = {
            "images_per_s": round(images / med, 1),
            "spread": round((max(seconds[kind]) - min(seconds[kind])) / med, 3),
            "bf16": in_bf16,
        }
        print(f"  {name} {kind}: {images / med:.0f} images/s", flush=True)
    return out


def loader_speed(data: Any, args: argparse.Namespace) -> float:
    """Images/s of one augmented epoch of pqd's loader over the benchmark's images."""
    from pqd.data import Loader

    n = args.batch * args.batches
    loader = Loader(data.train_x[:n], data.train_y[:n], args.batch, shuffle=True, augment=True)
    t = time.perf_counter()
    for _ in loader:
        pass
    return n / (time.perf_counter() - t)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pqd._version import __version__
    from pqd.data import load_dataset
    from pqd.measurement.env import environment

    torch.set_num_threads(args.threads)
    root = args.data_dir or str(ROOT.parent / "shared" / "data" / "cifar-10-subset")
    data = load_dataset("cifar10", root, val_size=0, download=False)
    env = environment(args.threads)
    print(f"{env['cpu']}, {args.threads} threads, torch {torch.__version__}", flush=True)
    peak = {"fp32": peak_gflops(torch.float32)}
    if "avx512_bf16" in env["cpu_flags"] or "amx_bf16" in env["cpu_flags"]:
        peak["bf16"] = peak_gflops(torch.bfloat16)
    print(f"  peak GFLOP/s: {peak}", flush=True)
    result = {
        "benchmark": "train_speed",
        "command": "python benchmarks/train_speed.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "pqd_version": __version__,
        "torch": torch.__version__,
        "cpu": env["cpu"],
        "cpu_flags": [
            f
            for f in env["cpu_flags"]
            if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16")
            or f.startswith("amx")
        ],
        "threads": args.threads,
        "batch": args.batch,
        "batches": args.batches,
        "rounds": args.rounds,
        "images": "real CIFAR-10 training images, 32 px",
        "peak_gflops": {k: round(v, 1) for k, v in peak.items()},
        "loader_images_per_s": round(loader_speed(data, args), 1),
        "models": [measure_model(m, data, args) for m in args.models],
    }
    for m in result["models"]:
        for st in m["steps"].values():
            p = peak["bf16" if st["bf16"] and "bf16" in peak else "fp32"]
            st["of_peak"] = round(st["images_per_s"] * m["train_flops_per_image"] / 1e9 / p, 4)
        base = m["steps"]["float"]["images_per_s"]
        for st in m["steps"].values():
            st["vs_float"] = round(base / st["images_per_s"], 2)
    return result


def render(result: dict[str, Any]) -> str:
    """The results page (Markdown) from the benchmark's JSON."""
    peak = ", ".join(f"{k} {v:g} GFLOP/s" for k, v in result["peak_gflops"].items())
    lines = [
        "# Training speed per step",
        "",
        f"`{result['command']}` on {result['date']}: pqd {result['pqd_version']}, torch "
        f"{result['torch']}, {result['cpu']} ({', '.join(result['cpu_flags'])}), "
        f"{result['threads']} threads, batch {result['batch']}, {result['batches']} batches of "
        f"{result['images']}, "
        + (
            f"every step kind timed in {result['rounds']} interleaved rounds (the median "
            "round; spread: (max - min) / median)."
            if result.get("rounds")
            else "every step kind timed once, one after the other (no spread measured)."
        ),
        "",
        f"Peak of this CPU in the same run (2048^3 matmul, forward + backward): {peak}. "
        f"Loader (one augmented epoch): {result['loader_images_per_s']:.0f} images/s.",
        "",
    ]
    spread = bool(result.get("rounds"))  # (a single round has none: no column)
    lines += [
        "| model | step | images/s | epoch time vs float | of peak | convs in |"
        + (" spread |" if spread else ""),
        "|---|---|---|---|---|---|" + ("---|" if spread else ""),
    ]
    for m in result["models"]:
        for step in STEPS:
            st = m["steps"].get(step)
            if st is None:
                continue
            cell = f" {100 * st['spread']:.0f}% |" if "spread" in st else " - |"
            lines.append(
                f"| {m['model']} | {step} | {st['images_per_s']:.0f} | {st['vs_float']:.2f}x | "
                f"{100 * st['of_peak']:.1f}% | {'bf16' if st['bf16'] else 'fp32'} |"
                + (cell if spread else "")
            )
    lines += [
        "",
        "Epoch time vs float: the float step's images/s over the step's, measured side by side "
        "in one run. `qat fp32 graph` is how pqd trained QAT graphs before the fast views "
        "(`pqd.quant.qat_train`); `qat` is the quantize stage now (10% of steps with BN and "
        "observers live, then frozen); `distill` runs the frozen QAT graph with its float "
        "teacher. Of peak: training FLOPs per second (torch's FLOP counter, forward and "
        "backward) over the matmul peak of the precision the convs run in.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["fastnet_q8", "resnet18", "vit_small"])
    p.add_argument("--batches", type=int, default=6, help="batches per timed epoch")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median counts)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default: the subset)")
    p.add_argument("--render", action="store_true", help="only render the page from the JSON")
    p.add_argument("--out", default=str(JSON_PATH), help="JSON to write (and render)")
    args = p.parse_args()
    out = Path(args.out)
    if not args.render:
        result = run(args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    result = json.loads(out.read_text(encoding="utf-8"))
    page = out.with_suffix(".md")
    page.write_text(render(result), encoding="utf-8")
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
