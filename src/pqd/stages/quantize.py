"""The quantize stage: insert fake-quant once, calibrate, mixed precision, QAT
(the machinery: :mod:`pqd.quant`)."""

from __future__ import annotations

from pqd.context import Context
from pqd.errors import RecipeError
from pqd.models.multi_exit import MultiExitNet
from pqd.quant.calibration import calibrate
from pqd.quant.layers import keep_float
from pqd.quant.prepare import prepare_qat, prepare_qat_parts, refresh_bn_stats
from pqd.quant.scheme import TYPE_KEYS, precision_label, quant_scheme, scheme_of
from pqd.recipe import QuantizeSpec
from pqd.registry import register_stage
from pqd.state import State
from pqd.target import reduces_range


def _calibration_loader(ctx: Context, spec: QuantizeSpec, batch_size: int):
    """The validation split (every choice pqd makes uses it); train only for QAT/dynamic
    when the recipe has no validation split."""
    if len(ctx.data.val_y) > 0:
        return "val", ctx.loader("val", batch_size)
    if spec.mode == "ptq" or spec.mixed_precision is not None:
        raise RecipeError(
            "quantize: PTQ calibration and mixed precision use the validation split, "
            "which is empty",
            "set data.val_size > 0",
        )
    return "train", ctx.loader("train", batch_size, seed=ctx.seed, shuffle=True)


@register_stage("quantize")
def apply_quantize(state: State, spec: QuantizeSpec, ctx: Context) -> State:
    """Insert fake-quant (once), calibrate on val, choose mixed precision, then fine-tune
    (QAT, dynamic with epochs) or stop (PTQ)."""
    cfg = ctx.train
    scheme = scheme_of(spec, reduces_range(ctx.target))
    if not state.quantized:
        # QAT, or a later stage, trains the graph: see refresh_bn_stats
        state.info["bn_stats_images"] = refresh_bn_stats(
            state.model,
            ctx.loader("train", cfg.batch_size, seed=ctx.seed, shuffle=True),
            spec.calibration_batches,
            ctx.device,
        )
        if isinstance(state.model, MultiExitNet):  # exits attached: one graph per part
            state.model = prepare_qat_parts(state.model, ctx.example_input(), scheme).to(ctx.device)
        else:
            state.model = prepare_qat(state.model, ctx.example_input(), scheme).to(ctx.device)
        state.quantized = True
        split, calib = (
            _calibration_loader(ctx, spec, cfg.batch_size)
            if ctx.forward_loop is None
            else ("forward_loop", None)
        )
        state.info["calibration_split"] = split
        state.info["calibration_images"] = calibrate(
            state.model,
            calib,
            spec.calibration_batches,
            ctx.device,
            scheme,
            forward_loop=ctx.forward_loop,
        )
        if spec.mixed_precision is not None:
            from pqd.quant.sensitivity import choose_mixed_precision

            state.info.update(
                choose_mixed_precision(
                    state.model, ctx.loader("val", 256), ctx.device, spec.mixed_precision
                )
            )
            keep_float(state.model, state.info["float_layers"])
    else:
        have = quant_scheme(state.model)
        same = all(have.get(k, False) == scheme[k] for k in TYPE_KEYS) and (
            (have["mode"] == "dynamic") == (spec.mode == "dynamic")
        )
        if not same or spec.mixed_precision is not None:
            raise RecipeError(
                "quantize: the model is already quantized; a repeated quantize stage only "
                "continues fine-tuning and cannot change the scheme or choose mixed precision",
                "give it the same mode (static or dynamic) and weights/activations options, "
                "without mixed_precision, or remove it",
            )
        state.info["note"] = (
            "already quantized: this stage continues fine-tuning (no new calibration)"
        )
    state.info["scheme"] = {**quant_scheme(state.model)}
    state.info["precision"] = precision_label(quant_scheme(state.model))
    if spec.mode != "ptq":
        freeze_at = spec.freeze_after if spec.mode == "qat" else None  # dynamic: per batch
        ctx.fit(state, cfg, spec.epochs, seed=ctx.seed, desc=ctx.desc, freeze_at=freeze_at)
    return state
