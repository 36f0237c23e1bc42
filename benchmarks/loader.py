"""Is the data loader ever the bottleneck? Loader images/s beside training images/s.

    python benchmarks/loader.py                          # 64 and 224 pixels, tiny_cnn + fastnet
    python benchmarks/loader.py --sizes 64 --images 256 --models tiny_cnn

Writes real CIFAR-10 subset images (``$PQD_DATA_DIR``) upscaled to 256x256 as JPEG files into
a temporary image folder, then per image size:

- ``decode``: the first :func:`pqd.data.from_folder` (JPEG decode + resize into the
  memory-mapped cache, once per folder and size), images/s;
- ``loader``: one epoch of :class:`pqd.data.Loader` over the cached train split with the
  training augmentation (random resized crop + flip at 64 pixels and more), images/s: what
  every later epoch costs;
- ``train <model>``: SGD steps (forward, backward, update; batch ``--batch``) of a zoo model
  on one fixed batch, images/s: the loader is not the bottleneck while ``loader`` is above
  every training column.

Prints a Markdown table and the CPU (lscpu's model name, torch threads).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    """lscpu's model name (else the platform's processor string)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def write_folder(root: Path, images: int, side: int = 256) -> None:
    """``images`` real subset images, upscaled to ``side`` pixels, as JPEG class folders."""
    from pqd.data import load_dataset, resolve_data_root

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import write_image_folder

    d = load_dataset("cifar10", resolve_data_root(None, None), val_size=0, download=False)
    write_image_folder(
        root / "train",
        d.train_x[:images],
        d.train_y[:images],
        d.classes,
        size=side,
        formats=("jpg",),
    )


def loader_rate(x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    """Images/s of one augmented, shuffled epoch of the Loader."""
    from pqd.data import Loader

    loader = Loader(x, y, batch, shuffle=True, augment=True, crop="auto", seed=0)
    t0 = time.perf_counter()
    n = sum(int(xb.shape[0]) for xb, _ in loader)
    return n / (time.perf_counter() - t0)


def train_rate(name: str, size: int, batch: int, steps: int, classes: int) -> float:
    """Images/s of ``steps`` SGD steps of zoo model ``name`` at ``size`` pixels (one warm-up
    step not counted)."""
    from pqd.models import build_model

    torch.manual_seed(0)
    model = build_model(name, classes, (0.5,) * 3, (0.25,) * 3).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, size, size)
    y = torch.randint(0, classes, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,224", help="image sides, pixels (comma-separated)")
    p.add_argument("--images", type=int, default=512, help="images in the folder")
    p.add_argument("--models", default="tiny_cnn,fastnet", help="zoo models to train")
    p.add_argument("--batch", type=int, default=32, help="batch size (loader and training)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per model")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from pqd.data import from_folder

    sizes = [int(s) for s in args.sizes.split(",")]
    models = [m for m in args.models.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="pqd-loader-") as tmp:
        root = Path(tmp) / "photos"
        write_folder(root, args.images)
        header = ["size", "decode img/s (once)", "loader img/s (every epoch)"]
        header += [f"train {m} img/s" for m in models] + ["loader / fastest training"]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for size in sizes:
            cache = Path(tmp) / f"cache{size}"
            t0 = time.perf_counter()
            data = from_folder(root, image_size=size, val_size=0, test_size=0.1, cache_dir=cache)
            decode = (len(data.train_y) + len(data.test_y)) / (time.perf_counter() - t0)
            data = from_folder(root, image_size=size, val_size=0, test_size=0.1, cache_dir=cache)
            load = loader_rate(data.train_x, data.train_y, args.batch)
            trains = [train_rate(m, size, args.batch, args.steps, data.num_classes) for m in models]
            row = [f"{size}x{size}", f"{decode:,.0f}", f"{load:,.0f}"]
            row += [f"{t:,.1f}" for t in trains] + [f"{load / max(trains):,.1f}x"]
            print("| " + " | ".join(row) + " |", flush=True)
    print(
        f"\nCPU: {cpu_name()}, {os.cpu_count()} logical cores, torch threads "
        f"{torch.get_num_threads()}; {args.images} JPEG images of 256x256; batch {args.batch}; "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
