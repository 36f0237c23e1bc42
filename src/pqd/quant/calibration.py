"""Calibration: activation ranges from statistics (min-max, percentile and entropy (KL)),
set on a prepared graph's quantizers by :func:`calibrate`.

Calibration runs the float network (fake-quant off) on the validation split twice: the
first pass finds each activation tensor's min and max, the second fills a fixed
``BINS``-bin histogram over that span (of ``|x|`` for symmetric quantization). A range
rule then turns the statistics into the tensor's quantization range:

- ``minmax``: the observed span (always containing 0, as every observer's does);
- ``percentile``: the span clipped at the ``p``-th percentile on each side (of ``|x|``
  when symmetric), e.g. 99.99 drops the most extreme 0.01% of values;
- ``entropy``: TensorRT's KL-divergence calibration (Migacz, "8-bit inference with
  TensorRT", GTC 2017): the clip threshold ``t`` on ``|x|`` whose quantized histogram
  (``levels`` levels over ``[0, t]``, values above ``t`` clipped into the last bin) has
  the least KL divergence from the unquantized one. torchao's HistogramObserver minimises
  the L2 quantization error instead, so this is a separate, small implementation.

Ranges are fractions-free floats in the activation's own units; histograms are counts.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pqd.models.multi_exit import MultiExitNet
from pqd.quant.layers import fake_quantizers, quantized_layers
from pqd.quant.scheme import quant_scheme
from pqd.train import set_train

BINS = 2048
_EPS = 1e-12


@dataclass
class TensorStats:
    """Statistics of one activation tensor over the calibration batches."""

    lo: float = float("inf")
    hi: float = float("-inf")
    hist: torch.Tensor | None = None  # counts over [span_lo, span_hi]
    span_lo: float = 0.0
    span_hi: float = 0.0
    symmetric: bool = False  # the histogram is of |x| over [0, max|x|]

    def observe_range(self, x: torch.Tensor) -> None:
        """Pass 1: widen [lo, hi] to hold ``x``."""
        x = x.detach()
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    def start_histogram(self, symmetric: bool, bins: int = BINS) -> None:
        """Fix the histogram span from pass 1 (zero always inside it)."""
        self.symmetric = symmetric
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if symmetric:
            lo, hi = 0.0, max(abs(lo), abs(hi))
        if hi <= lo:
            hi = lo + 1e-8
        self.span_lo, self.span_hi = lo, hi
        self.hist = torch.zeros(bins, dtype=torch.float64)

    def observe_histogram(self, x: torch.Tensor) -> None:
        """Pass 2: add ``x`` (or ``|x|``) to the histogram."""
        if self.hist is None:
            raise RuntimeError("start_histogram() must run before observe_histogram()")
        v = x.detach().float().flatten()
        if self.symmetric:
            v = v.abs()
        h = torch.histc(v.cpu(), bins=len(self.hist), min=self.span_lo, max=self.span_hi)
        self.hist += h.double()

    def range(
        self, observer: str, *, symmetric: bool, levels: int, percentile: float = 99.99
    ) -> tuple[float, float]:
        """The (low, high) quantization range by ``observer`` (minmax | percentile | entropy)."""
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if symmetric:
            amax = max(-lo, hi)
            lo, hi = -amax, amax
        if observer == "minmax":
            return lo, hi
        if self.hist is None:
            raise RuntimeError(f"observer {observer!r} needs a histogram (pass 2)")
        hist = self.hist.numpy()
        if observer == "percentile":
            return percentile_range(
                hist, self.span_lo, self.span_hi, percentile, magnitude=self.symmetric
            )
        if observer == "entropy":
            if not self.symmetric:
                raise RuntimeError("entropy calibration works on a histogram of |x|")
            t = entropy_threshold(hist, self.span_hi, levels)
            return (-t, t) if symmetric else (max(lo, -t), min(hi, t))
        raise ValueError(f"unknown observer {observer!r}")


def _quantile(hist: np.ndarray, lo: float, hi: float, q: float) -> float:
    """Value below which a fraction ``q`` of the histogram's mass lies (linear in a bin)."""
    total = hist.sum()
    if total <= 0:
        return lo
    cum = np.cumsum(hist)
    target = q * total
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, len(hist) - 1)
    before = cum[i - 1] if i > 0 else 0.0
    frac = (target - before) / hist[i] if hist[i] > 0 else 0.0
    width = (hi - lo) / len(hist)
    return lo + (i + min(max(frac, 0.0), 1.0)) * width


def percentile_range(
    hist: np.ndarray, lo: float, hi: float, percentile: float, *, magnitude: bool
) -> tuple[float, float]:
    """Range clipped at ``percentile`` (e.g. 99.99) from a histogram over ``[lo, hi]``.

    ``magnitude``: the histogram is of ``|x|``: returns ``(-t, t)`` with ``t`` its
    percentile. Otherwise both tails are clipped; the range always contains 0.
    """
    p = percentile / 100.0
    if magnitude:
        t = _quantile(hist, lo, hi, p)
        return -t, t
    return min(_quantile(hist, lo, hi, 1.0 - p), 0.0), max(_quantile(hist, lo, hi, p), 0.0)


def entropy_threshold(hist: np.ndarray, amax: float, levels: int = 128) -> float:
    """KL-optimal clip threshold ``t`` (same units as ``amax``) for a histogram of ``|x|``.

    ``hist`` holds counts of ``|x|`` in equal bins over ``[0, amax]``; ``levels`` is the
    number of quantization levels on ``[0, t]`` (128 for int8 symmetric or signed data,
    256 for non-negative data in uint8). For every candidate ``t`` = the upper edge of
    bin ``i - 1`` (``i >= levels``): P is ``hist[:i]`` with all mass above ``t`` added to
    its last bin; Q is ``hist[:i]`` merged into ``levels`` groups, each group's count
    spread evenly over its non-empty bins. Returns the ``t`` of the least KL(P || Q).
    Bin 0 counts as bin 1 (post-ReLU data is half exact zeros).
    """
    hist = np.asarray(hist, dtype=np.float64)
    n = len(hist)
    if n <= levels or hist.sum() <= 0:
        return float(amax)
    hist = hist.copy()
    hist[0] = hist[1]  # the exact zeros of a ReLU output (a spike in bin 0) would make the
    # smallest candidate win, where bin 0 stays alone in Q (NVIDIA pytorch-quantization too)
    width = amax / n
    tail = np.cumsum(hist[::-1])[::-1]  # tail[i] = hist[i:].sum()
    best_i, best_kl = n, np.inf
    for i in range(levels, n + 1):
        sliced = hist[:i]
        p = sliced.copy()
        if i < n:
            p[-1] += tail[i]
        group = (np.arange(i) * levels) // i
        nonzero = sliced > 0
        q_sum = np.bincount(group, weights=sliced, minlength=levels)
        q_cnt = np.bincount(group, weights=nonzero.astype(np.float64), minlength=levels)
        q = np.where(nonzero, q_sum[group] / np.maximum(q_cnt[group], 1.0), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps <= 0 or qs <= 0:
            continue
        mask = p > 0
        p_n = p[mask] / ps
        q_n = np.maximum(q[mask] / qs, _EPS)  # mass clipped into an empty bin: large cost
        kl = float(np.sum(p_n * np.log(p_n / q_n)))
        if kl <= best_kl:  # ties: the larger threshold (as NVIDIA's reference does)
            best_kl, best_i = kl, i
    return float(best_i * width)


# ---------------------------------------------------------------------------- calibrate


@torch.no_grad()
def calibrate(
    model: nn.Module,
    loader,
    batches: int,
    device: torch.device,
    scheme: dict[str, Any] | None = None,
    forward_loop: Callable[[nn.Module], None] | None = None,
) -> int:
    """Set every activation range from ``batches`` batches of ``loader``, or from what
    ``forward_loop(model)`` runs through the model (the user's own calibration loop, as in
    ModelOpt's ``mtq.quantize``); returns images seen.

    The float network runs (fake-quant off); weight quantizers observe their weights;
    each static activation quantizer gets the range of ``scheme["observer"]`` over the
    batches (:class:`TensorStats`). Afterwards fake-quant is on and activation observers
    are off, except in QAT with minmax ranges, where torchao's moving average goes on
    tracking them during training.

    Args:
        model: a prepared graph, or a multi-exit net of them (every exit is calibrated).
        loader: yields ``(images, labels)`` batches (unused with ``forward_loop``).
        batches: how many batches of ``loader`` to run.
        device: where the model is.
        scheme: the quantization scheme; default: the one stored on the model.
        forward_loop: the user's calibration loop, run instead of ``loader``.

    Returns:
        Images seen (per pass: the histogram pass sees the same ones again).
    """
    scheme = scheme or quant_scheme(model)
    weight_names = {lq.weight_fq for lq in quantized_layers(model).values() if lq.weight_fq}
    fqs = dict(fake_quantizers(model))
    acts = _range_quantizers(fqs, weight_names)
    for name, m in fqs.items():
        m.fake_quant_enabled[0] = 0
        m.observer_enabled[0] = 1 if name in weight_names else 0
    stats = {n: TensorStats() for n in acts}
    observer = scheme["observer"]
    symmetric = scheme["activation_symmetric"]
    set_train(model, False)
    if forward_loop is not None:
        feed = functools.partial(_feed_loop, model, forward_loop)
    else:
        feed = functools.partial(_feed_batches, model, loader, batches, device)

    def run(observe: Callable[[TensorStats, torch.Tensor], None]) -> int:
        with _observing(acts, stats, observe):
            return feed()

    seen = run(lambda s, x: s.observe_range(x))
    if observer != "minmax":
        for s in stats.values():
            s.start_histogram(symmetric or observer == "entropy")
        run(lambda s, x: s.observe_histogram(x))
    for name, m in acts.items():
        _set_range(m, stats[name], scheme)
    for name in weight_names:  # the fused observer computes qparams only with fake-quant on
        m = fqs[name]
        _store_qparams(m, *m.calculate_qparams())
    track = scheme["mode"] == "qat" and observer == "minmax"
    for name, m in fqs.items():
        m.fake_quant_enabled[0] = 1
        if name in acts:
            m.observer_enabled[0] = 1 if track else 0
    return seen


def _range_quantizers(fqs: dict[str, nn.Module], weight_names: set[str]) -> dict[str, nn.Module]:
    """The activation fake-quantizers whose range calibration sets: not the weights', not
    the dynamic ones (each batch's own range) and not the fixed ones (no observer)."""
    return {
        n: m
        for n, m in fqs.items()
        if n not in weight_names
        and not getattr(m, "is_dynamic", False)
        and hasattr(getattr(m, "activation_post_process", None), "min_val")  # not fixed
    }


@contextlib.contextmanager
def _observing(
    acts: dict[str, nn.Module],
    stats: dict[str, TensorStats],
    observe: Callable[[TensorStats, torch.Tensor], None],
) -> Iterator[None]:
    """Within the block, ``observe(stats[name], input)`` runs on every input that
    activation quantizer ``name`` sees."""
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, n=n: observe(stats[n], args[0]))
        for n, m in acts.items()
    ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _feed_loop(model: nn.Module, forward_loop: Callable[[nn.Module], None]) -> int:
    """Run the user's ``forward_loop(model)``; returns the images it passed to the model."""
    counted: list[int] = []
    hook = model.register_forward_pre_hook(lambda _m, args: counted.append(len(args[0])))
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        hook.remove()
    return sum(counted)


def _feed_batches(model: nn.Module, loader, batches: int, device: torch.device) -> int:
    """Run the first ``batches`` batches of ``loader`` through ``model`` (a multi-exit net
    through every exit); returns images seen."""
    seen = 0
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        if isinstance(model, MultiExitNet):
            model.forward_all(x.to(device))  # the exit heads' quantizers too
        else:
            model(x.to(device))
        seen += x.shape[0]
    return seen


def _set_range(m: nn.Module, s: TensorStats, scheme: dict[str, Any]) -> None:
    """Give activation fake-quantizer ``m`` the range of ``scheme``'s observer over the
    statistics ``s``, and the scale and zero point of that range."""
    if s.hi < s.lo:  # never reached (dead branch): keep torchao's defaults
        return
    symmetric = scheme["activation_symmetric"]
    nonneg = s.lo >= 0.0 and not symmetric
    lo, hi = s.range(
        scheme["observer"],
        symmetric=symmetric,
        levels=256 if nonneg else 128,
        percentile=scheme["percentile"],
    )
    obs: Any = m.activation_post_process  # a torchao observer: min_val/max_val buffers
    obs.min_val.resize_(()).fill_(lo)
    obs.max_val.resize_(()).fill_(hi)
    _store_qparams(m, *obs.calculate_qparams())


def _store_qparams(m: nn.Module, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
    """Copy ``scale`` and ``zero_point`` into fake-quantizer ``m``'s buffers (resized)."""
    m.scale.resize_(scale.shape).copy_(scale)
    m.zero_point.resize_(zero_point.shape).copy_(zero_point)
