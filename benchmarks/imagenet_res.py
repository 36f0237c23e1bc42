"""ResNet-18 ImageNet-style at real resolutions: prune -> quantize -> distill, FP32 vs INT8.

    python benchmarks/imagenet_res.py                      # 64x64 and 224x224
    python benchmarks/imagenet_res.py --sizes 64 --limit-train 64 --out runs/imres
    python benchmarks/imagenet_res.py --records runs/imres/s64 runs/imres2/s224   # table only

For each size, ``resnet18_imagenet`` (torchvision's layout, 1000 -> 10 classes) goes
through ``pqd.compress`` with prune (50% unstructured) -> quantize (INT8 QAT) -> distill on
real CIFAR-10 subset images upsampled to the size (``torch.nn.functional.interpolate``,
bilinear), with small limits and one epoch per stage so that both sizes run in minutes on
two cores. The baseline is taken as built (no training): the accuracies are NOT meaningful
(a subset of upsampled CIFAR-10, untrained weights); the latencies are: the FP32 and INT8
ONNX files' batch-1 p50 on onnxruntime, side by side, with the speed-up, and the CPU
(lscpu model name and the flags that decide INT8 speed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SUBSET = [
    ROOT.parent / "shared" / "data" / "cifar-10-subset",
    Path("/work/shared/data/cifar-10-subset"),
]


def cpu_line() -> str:
    """``lscpu``'s model name and the INT8-relevant flags (pqd.measurement.env's list)."""
    from pqd.measurement.env import cpu_flags, cpu_model

    name = cpu_model()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    flags = ", ".join(cpu_flags()) or "none of avx2/avx512/vnni/amx"
    return f"{name} ({os.cpu_count()} logical CPUs; flags: {flags})"


def subset_root(given: str | None) -> Path:
    for root in [Path(given)] if given else [*SUBSET, Path(os.environ.get("PQD_DATA_DIR", "."))]:
        if (root / "cifar-10-batches-py").is_dir():
            return root
    raise SystemExit("imagenet_res: error: the CIFAR-10 subset is missing; fix: --data-dir DIR")


def upsampled(root: Path, size: int, limit_train: int, limit_test: int) -> Any:
    """The subset's images resized to ``size`` x ``size`` (bilinear), as a pqd Dataset."""
    import torch.nn.functional as F

    import pqd
    from pqd.data import load_dataset

    ds = load_dataset(
        "cifar10", root, val_size=32, limit_train=limit_train, limit_test=limit_test, download=False
    )

    def up(x: Any) -> Any:
        return F.interpolate(x.float() / 255, size=size, mode="bilinear", align_corners=False)

    return pqd.data.from_tensors(
        train=(up(ds.train_x), ds.train_y),
        val=(up(ds.val_x), ds.val_y),
        test=(up(ds.test_x), ds.test_y),
        mean=ds.mean,
        std=ds.std,
        num_classes=ds.num_classes,
    )


def run_size(size: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """prune -> quantize -> distill at ``size``; the record's figures for the table."""
    import torch

    import pqd
    from pqd.models import build_model

    data = upsampled(root, size, args.limit_train, args.limit_test)
    torch.manual_seed(0)
    model = build_model("resnet18_imagenet", data.num_classes, data.mean, data.std)
    stages = [
        pqd.Prune(sparsity=0.5, epochs=args.epochs),
        pqd.Quantize(epochs=args.epochs, calibration_batches=2),
        pqd.Distill(epochs=args.epochs),
    ]
    t0 = time.perf_counter()
    result = pqd.compress(
        model,
        data,
        stages,
        out=Path(args.out) / f"s{size}",
        train={"batch_size": args.batch_size, "lr": 0.01},
        measure={
            "runtimes": ["onnxruntime"],
            "batch_sizes": [1],
            "threads": args.threads,
            "warmup": args.warmup,
            "repeats": args.repeats,
        },
        fresh=True,
    )
    return row_of(result.record, size, time.perf_counter() - t0)


def row_of(record: dict[str, Any], size: int, wall: float) -> dict[str, Any]:
    """The table's figures from one run's record.json."""
    b, f = record["baseline"], record["final"]
    return {
        "size": size,
        "macs": b["macs"],
        "fp32_p50": b["latency_ms"]["p50"],
        "int8_p50": f["latency_ms"]["p50"],
        "fp32_acc": b["accuracy"],
        "int8_acc": f["accuracy"],
        "precision": f["precision"],
        "wall_s": wall,
        "threads": record["environment"]["measure_threads"],
    }


def render(rows: list[dict[str, Any]], cpu: str) -> str:
    """The Markdown table (FP32 vs INT8 p50 side by side) and the CPU line."""
    lines = [
        "| input | GMACs | FP32 p50 ms | INT8 p50 ms | INT8 speed-up | top-1 FP32 / INT8 | run s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']}x{r['size']} | {r['macs'] / 1e9:.3f} | {r['fp32_p50']:.2f} | "
            f"{r['int8_p50']:.2f} | {r['fp32_p50'] / r['int8_p50']:.2f}x | "
            f"{100 * r['fp32_acc']:.1f}% / {100 * r['int8_acc']:.1f}% | {r['wall_s']:.0f} |"
        )
    threads = rows[0]["threads"] if rows else "?"
    lines.append("")
    lines.append(
        f"CPU: {cpu}; onnxruntime, batch 1, {threads} thread(s). Subset, upsampled "
        "CIFAR-10, accuracies not meaningful (untrained baseline, one epoch per stage)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    ap.add_argument("--limit-train", type=int, default=96, help="train images (val: 32 of them)")
    ap.add_argument("--limit-test", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1, help="epochs per stage")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--data-dir", default=None, help="the CIFAR-10 subset folder")
    ap.add_argument("--out", default="runs/imagenet_res")
    ap.add_argument(
        "--records",
        nargs="+",
        default=None,
        help="no run: the table of finished runs' "
        "folders (OUT/s64 ...; the size is read from the folder name)",
    )
    args = ap.parse_args(argv)
    if args.records:
        rows = []
        for folder in map(Path, args.records):
            record = json.loads((folder / "record.json").read_text())
            size = int(folder.name.lstrip("s"))
            rows.append(row_of(record, size, record["timing_s"]["total"]))
        print(render(rows, cpu_line()))
        return 0
    root = subset_root(args.data_dir)
    rows = []
    for size in args.sizes:
        print(f"imagenet_res: {size}x{size} ...", file=sys.stderr, flush=True)
        rows.append(run_size(size, args, root))
    print(render(rows, cpu_line()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
