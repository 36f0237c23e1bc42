"""What the JPEG copies of CIFAR-10 cost in accuracy: one net trained the same way on the
official pixels and on their JPEG copies, each tested on its own kind of the same images.

    python benchmarks/jpeg_cost.py --results docs/results      # ~35 min on 2 cores
    python benchmarks/jpeg_cost.py --results docs/results --render

pqd's full-scale figures come from ``cifar-10-jpg`` (the whole CIFAR-10 as JPEG files,
pixels about 6/255 off the official ones); only a subset exists here in the official
pickles (5,170 train and the first 1,017 test images). Every subset image has its JPEG copy
in the folder: this benchmark finds it (per class, the nearest JPEG by pixel distance; the
mean absolute difference is checked), then, per seed, trains the recipe's model with the
recipe's training settings for ``--epochs`` on the clean 5,170 images and on their 5,170
JPEG copies (the same seed, batches and augmentation), and tests each on its own kind of
the 1,017 test images. The difference is paired per image and pooled over the seeds
(``pqd.stats.compare_over_seeds``: bootstrap interval, exact McNemar, seed spread); the
cross tests (clean-trained on JPEG, JPEG-trained on clean) show the shift between the two.
Writes ``jpeg-cost.json`` and renders ``jpeg-cost.md`` from it.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_page import footer, publish

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
NAME = "jpeg-cost"
MAX_MEAN_ABS = 20.0
"""A match farther than this (mean absolute difference, levels of 255) is not the same image
(the folder's README: copies differ by 5.8 on average, 13 at most)."""


def _log(msg: str) -> None:
    print(f"[jpeg_cost] {msg}", file=sys.stderr, flush=True)


def nearest(clean: torch.Tensor, pool: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """For each clean image, the index of the nearest image of ``pool`` (Euclidean distance
    over the pixels) and the mean absolute difference to it (levels of 255).

    Args:
        clean: uint8 ``[N, C, H, W]``.
        pool: uint8 ``[M, C, H, W]``, same size.

    Returns:
        ``(index [N], mean_abs [N])``.
    """
    a = clean.reshape(len(clean), -1).double()
    b = pool.reshape(len(pool), -1).double()
    dist = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None] - 2.0 * a @ b.T
    idx = dist.argmin(1)
    mad = (a - b[idx]).abs().mean(1)
    return idx.numpy(), mad.numpy()


def match(
    clean_x: torch.Tensor, clean_y: torch.Tensor, jpeg_x: torch.Tensor, jpeg_y: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """The JPEG copy of every clean image, searched among the JPEGs of its class.

    Args:
        clean_x, clean_y: the official-pixel images (uint8 ``[N, C, H, W]``) and labels.
        jpeg_x, jpeg_y: the JPEG images and labels to search.

    Returns:
        ``(index into jpeg_x [N], mean absolute difference [N])``.

    Raises:
        SystemExit: an image without a close copy, or two images with the same copy.
    """
    out = np.full(len(clean_y), -1)
    mad = np.zeros(len(clean_y))
    for c in torch.unique(clean_y).tolist():
        mine = (clean_y == c).nonzero().flatten()
        pool = (jpeg_y == c).nonzero().flatten()
        idx, d = nearest(clean_x[mine], jpeg_x[pool])
        out[mine.numpy()] = pool.numpy()[idx]
        mad[mine.numpy()] = d
    if mad.max() > MAX_MEAN_ABS or len(set(out.tolist())) != len(out):
        raise SystemExit(
            f"benchmarks/jpeg_cost.py: error: the JPEG folder does not hold a copy of every "
            f"subset image (largest mean difference {mad.max():.1f}/255, "
            f"{len(out) - len(set(out.tolist()))} shared copies); fix: point --jpeg at "
            "cifar-10-jpg and --subset at the official-layout subset"
        )
    return out, mad


def train_and_test(
    recipe: Any,
    train: tuple[torch.Tensor, torch.Tensor],
    tests: dict[str, tuple[torch.Tensor, torch.Tensor]],
    epochs: int,
    seed: int,
) -> tuple[dict[str, np.ndarray], float]:
    """The recipe's model trained as its baseline is, from ``seed``, on ``train``.

    Args:
        recipe: the recipe (model, ``baseline_train()`` settings, ``data.augment``).
        train: uint8 images ``[N, 3, H, W]`` and their labels.
        tests: name -> (images, labels) to predict.
        epochs: passes over ``train``.
        seed: model initialisation, batch order and augmentation.

    Returns:
        ``(name -> predicted class per test image, training wall seconds)``.
    """
    from pqd.data import Loader
    from pqd.dataset import channel_stats
    from pqd.models import build_model
    from pqd.train import fit, predict

    x, y = train
    mean, std = channel_stats(x)
    torch.manual_seed(seed)
    model = build_model(recipe.model.name, 10, mean, std, **recipe.model.kwargs)
    cfg, aug, cpu = recipe.baseline_train(), recipe.data.augment, torch.device("cpu")
    loader = Loader(
        x,
        y,
        cfg.batch_size,
        shuffle=True,
        augment=True,
        crop="pad",
        crop_padding=aug.crop_padding,
        pad_mode=aug.pad_mode,
        flip=aug.flip,
        cutout=aug.cutout,
        seed=seed,
    )
    t0 = time.perf_counter()
    fit(model, loader, cfg, epochs, device=cpu, progress=False, desc=f"seed {seed}")
    seconds = time.perf_counter() - t0
    preds = {}
    for name, (tx, ty) in tests.items():
        logits, _ = predict(
            model, Loader(tx, ty, 256), device=cpu, amp=cfg.amp, channels_last=True, progress=False
        )
        preds[name] = logits.argmax(1).numpy()
    return preds, seconds


def run(
    recipe_path: Path, subset: Path, jpeg: Path, epochs: int | None, seeds: list[int]
) -> dict[str, Any]:
    """Match, train both arms per seed, compare.

    Args:
        recipe_path: the recipe whose model, baseline settings and augmentation are used.
        subset: the folder holding ``cifar-10-batches-py`` (official pixels).
        jpeg: ``cifar-10-jpg`` (``train/<class>/`` and ``test/<class>/`` JPEG files).
        epochs: passes per run (default: the recipe's baseline epochs).
        seeds: one clean and one JPEG run per seed.

    Returns:
        The benchmark's JSON (accuracies as fractions, seconds).
    """
    from pqd.data import load_dataset
    from pqd.measurement.env import environment
    from pqd.recipe import load_recipe
    from pqd.stats import accuracy_summary, compare_over_seeds, seed_summary

    recipe = load_recipe(recipe_path)
    epochs = recipe.baseline.epochs if epochs is None else epochs
    clean = load_dataset("cifar10", subset, val_size=0)
    jpg = load_dataset("folder", jpeg, val_size=0, image_size=32, progress=False)
    if clean.classes != jpg.classes:
        raise SystemExit(
            f"benchmarks/jpeg_cost.py: error: the class folders {jpg.classes} are not the "
            f"subset's classes {clean.classes}; fix: point --jpeg at cifar-10-jpg"
        )
    t0 = time.perf_counter()
    tr_idx, tr_mad = match(clean.train_x, clean.train_y, jpg.train_x, jpg.train_y)
    te_idx, te_mad = match(clean.test_x, clean.test_y, jpg.test_x, jpg.test_y)
    _log(
        f"matched {len(tr_idx)} train and {len(te_idx)} test images in "
        f"{time.perf_counter() - t0:.0f} s (mean difference {tr_mad.mean():.2f}/255)"
    )
    train = {
        "clean": (clean.train_x, clean.train_y),
        "jpeg": (jpg.train_x[torch.from_numpy(tr_idx)].contiguous(), clean.train_y),
    }
    tests = {
        "clean": (clean.test_x, clean.test_y),
        "jpeg": (jpg.test_x[torch.from_numpy(te_idx)].contiguous(), clean.test_y),
    }
    labels = clean.test_y.numpy()
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        for arm in ("clean", "jpeg"):
            _log(f"seed {seed}: training on the {arm} images ({epochs} epochs)")
            preds, seconds = train_and_test(recipe, train[arm], tests, epochs, seed)
            runs.append(
                {
                    "seed": seed,
                    "train": arm,
                    "train_s": round(seconds, 1),
                    "correct": {k: (p == labels).astype(int).tolist() for k, p in preds.items()},
                }
            )

    def correct(arm: str, test: str, seed: int) -> np.ndarray:
        r = next(r for r in runs if r["train"] == arm and r["seed"] == seed)
        return np.asarray(r["correct"][test], bool)

    pairs = [(correct("clean", "clean", s), correct("jpeg", "jpeg", s)) for s in seeds]
    cells = {
        f"{arm}->{test}": {
            "per_seed": [accuracy_summary(correct(arm, test, s)) for s in seeds],
            "over_seeds": seed_summary(
                [float(correct(arm, test, s).mean()) for s in seeds], len(labels)
            ),
        }
        for arm in ("clean", "jpeg")
        for test in ("clean", "jpeg")
    }
    return {
        "benchmark": NAME,
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/jpeg_cost.py " + " ".join(sys.argv[1:]),
        "recipe": str(
            recipe_path.relative_to(ROOT) if recipe_path.is_relative_to(ROOT) else recipe_path
        ),
        "model": {"name": recipe.model.name, "kwargs": recipe.model.kwargs},
        "train": recipe.baseline_train().model_dump(),
        "augment": recipe.data.augment.model_dump(),
        "epochs": epochs,
        "seeds": seeds,
        "data": {
            "train": len(tr_idx),
            "test": len(te_idx),
            "match_mean_abs": {
                "train_mean": round(float(tr_mad.mean()), 3),
                "train_max": round(float(tr_mad.max()), 3),
                "test_mean": round(float(te_mad.mean()), 3),
                "test_max": round(float(te_mad.max()), 3),
            },
        },
        "cells": cells,
        "clean_vs_jpeg": compare_over_seeds(pairs),
        "runs": runs,
        "environment": environment(torch.get_num_threads()),
    }


def _shown(path: Path) -> str:
    """``path`` relative to the checkout when inside it (pages do not name this machine)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def render(r: dict[str, Any]) -> str:
    """The results page (Markdown) from the benchmark's JSON."""
    c = r["clean_vs_jpeg"]
    m = r["data"]["match_mean_abs"]
    t, a = r["train"], r["augment"]
    settings = (
        f"batch {t['batch_size']}, {t['optimizer']} lr {t['lr']:g} {t['schedule']}, label "
        f"smoothing {t['label_smoothing']:g}, weight average {t.get('ema') or 'off'}, crop "
        f"padding {a['crop_padding']}, flip {'on' if a['flip'] else 'off'}, cutout "
        f"{a.get('cutout') or 'off'}"
    )
    lines = [
        "# What the JPEG copies of CIFAR-10 cost",
        "",
        f"The recipe's net (`{r['model']['name']}`, {r['recipe']}) trained {r['epochs']} epochs "
        f"({settings}) on the {r['data']['train']:,} official-pixel subset images "
        f"and, with the same seed, batches and augmentation, on their JPEG copies from "
        f"`cifar-10-jpg`; each tested on the first {r['data']['test']:,} official test images, "
        "clean and as JPEG. Seeds: " + ", ".join(map(str, r["seeds"])) + ". Subset scale: the "
        "accuracies are far below full-data ones; what carries over is the gap.",
        "",
        "| trained on | tested on | top-1 per seed [95% CI] | mean over seeds [t 95% CI] |",
        "|---|---|---|---|",
    ]
    for key, cell in r["cells"].items():
        arm, test = key.split("->")
        per = "; ".join(
            f"{_pct(s['accuracy'])} [{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}]"
            for s in cell["per_seed"]
        )
        o = cell["over_seeds"]
        mean = f"{_pct(o['mean'])} [{100 * o['ci_low']:.1f}, {100 * o['ci_high']:.1f}]"
        lines.append(f"| {arm} | {test} | {per} | {mean if o['seeds'] > 1 else 'one seed'} |")
    p = c["p_value"]
    verdict = (
        "tie"
        if c["ci_low"] <= 0 <= c["ci_high"]
        else "clean better"
        if c["difference"] > 0
        else "JPEG better"
    )
    lines += [
        "",
        f"**JPEG cost** (clean->clean minus jpeg->jpeg, the same images, pooled over "
        f"{c['seeds']} seeds): {100 * c['difference']:+.2f} points "
        f"[{100 * c['ci_low']:+.2f}, {100 * c['ci_high']:+.2f}] (paired bootstrap), exact "
        f"McNemar p = {p:.2g} ({c['a_only']} images only the clean-trained net gets, "
        f"{c['b_only']} only the JPEG-trained one): **{verdict}**. Per seed: "
        + ", ".join(f"{100 * d:+.2f}" for d in c["per_seed"])
        + f" points; {c['dominant']} dominates.",
        "",
        f"- Matching: every subset image's nearest JPEG of its class, mean absolute "
        f"difference {m['train_mean']:.2f}/255 (train, max {m['train_max']:.1f}) and "
        f"{m['test_mean']:.2f}/255 (test, max {m['test_max']:.1f}).",
        "- Training seconds per run: "
        + ", ".join(f"{x['train']} s{x['seed']} {x['train_s']:.0f}" for x in r["runs"]),
        *footer(r),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "cifar10.yaml")
    ap.add_argument("--subset", type=Path, default=SHARED / "cifar-10-subset")
    ap.add_argument("--jpeg", type=Path, default=SHARED / "cifar-10-jpg")
    ap.add_argument("--epochs", type=int, help="default: the recipe's baseline epochs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--render", action="store_true", help="the page again from the JSON")
    args = ap.parse_args(argv)
    return publish(
        "jpeg_cost.py",
        NAME,
        args.results,
        args.render,
        lambda: run(args.recipe, args.subset, args.jpeg, args.epochs, args.seeds),
        render,
    )


if __name__ == "__main__":
    raise SystemExit(main())
