"""Deployment targets: which CPUs an INT8 file is built and validated for.

x86 CPUs without VNNI (AVX2 only: most laptops, older servers, AMD Zen 1-3) run u8 x s8
integer kernels with ``vpmaddubsw``, which multiplies adjacent pairs of bytes and adds each
pair into a *saturating* int16. With uint8 activations (up to 255) a pair of 8-bit weights
overflows when ``255 * (|w_a| + |w_b|) > 32767`` (both weights of one sign), so the file
answers differently there than on the VNNI machine that built it. onnxruntime's quantizer
offers ``reduce_range`` (7-bit weights) for exactly this; pqd does the same *during QAT and
calibration*, so the scales that ship are the ones the model learned with.

Targets (``export.target``):

- ``portable`` (default): 7-bit weights in [-64, 63]; exact on every x86 CPU (and on Arm,
  whose integer kernels accumulate in int32). The build machine is rarely the deployment
  machine, so this is the default.
- ``x86-avx2``: the same 7-bit weights, named for an AVX2 deployment.
- ``x86-vnni``: full 8-bit weights in [-128, 127]; exact only where the CPU has VNNI
  (``avx512_vnni``, ``avx_vnni``) or AMX, whose instructions accumulate in int32.
- ``auto``: the measuring machine's own kind, from its CPU flags.

The record says which target a file was built for; :func:`assess` turns the measured
parity and this machine's flags into ``parity_ok`` and one line per problem.
"""

from __future__ import annotations

import platform
from typing import Any

from pqd.measurement.env import cpu_flags, has_vnni
from pqd.stats import wilson_interval

TARGETS = ("portable", "x86-avx2", "x86-vnni", "auto")
# 7-bit weights: 255 * (64 + 64) = 32640 <= 32767, no int16 pair can overflow
REDUCED_WEIGHT_RANGE = (-64, 63)
FULL_WEIGHT_RANGE = (-128, 127)


def resolve(target: str, flags: list[str] | None = None) -> str:
    """The concrete target for ``target``: ``auto`` becomes this machine's kind.

    Args:
        target: one of :data:`TARGETS`.
        flags: the CPU flags that decide ``auto`` (default: this machine's, from
            :func:`pqd.measurement.env.cpu_flags`).

    Returns:
        ``portable``, ``x86-avx2`` or ``x86-vnni``.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if target != "auto":
        return target
    if flags is None:
        flags = cpu_flags()
    if has_vnni(flags):
        return "x86-vnni"
    return "x86-avx2" if _is_x86() else "portable"


def reduces_range(target: str) -> bool:
    """Whether ``target`` (resolved) trains and ships 7-bit weights."""
    return resolve(target) != "x86-vnni"


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def assess(
    artifact: dict[str, Any], target: str | None, flags: list[str], min_agreement: float
) -> dict[str, Any]:
    """The parity verdict of one measured artifact on this machine.

    Args:
        artifact: a record artifact (``runtimes`` with each runtime's ``parity`` and
            optionally ``saturation``).
        target: the resolved target the file was built for (None: a float file).
        flags: this machine's CPU flags (``environment.cpu_flags``).
        min_agreement: the lowest acceptable top-1 agreement (fraction) with the torch model.

    Returns:
        ``{"parity_ok": bool, "parity_problems": [one line each]}``: agreement below
        ``min_agreement`` on any runtime beyond the noise of its images (the 95% Wilson
        interval of the agreement lies wholly below it), a file with saturating weight
        pairs measured on a CPU without VNNI, or a file built for ``x86-vnni`` measured on
        such a CPU.
    """
    problems = []
    x86_without_vnni = "avx2" in flags and not has_vnni(flags)
    sat = artifact.get("saturation") or {}
    # the cause first, then what it did to the answers
    if x86_without_vnni and target == "x86-vnni":
        problems.append(
            "built for target x86-vnni (8-bit weights) but measured on a CPU "
            "without VNNI, whose int16 pair sums can saturate"
        )
    elif x86_without_vnni and sat.get("pairs_at_risk", 0) > 0:
        problems.append(
            f"{sat['pairs_at_risk']} weight pairs can saturate the int16 sums "
            "of this CPU's INT8 kernels (no VNNI)"
        )
    for rt, res in artifact.get("runtimes", {}).items():
        if "parity" not in res:  # measured without its torch model
            continue
        agree, n = res["parity"]["top1_agreement"], int(res["parity"]["samples"])
        lo, hi = wilson_interval(round(agree * n), n) if n else (agree, agree)
        if hi < min_agreement:  # below the minimum beyond the noise of n images
            problems.append(
                f"{rt}: the file agrees with its torch model on only {100 * agree:.2f}% of "
                f"{n} test images (95% CI {100 * lo:.2f}-{100 * hi:.2f}%, below the "
                f"{100 * min_agreement:.0f}% expected; max |logit diff| "
                f"{res['parity']['max_abs_logit_diff']:.3g})"
            )
    return {"parity_ok": not problems, "parity_problems": problems}
