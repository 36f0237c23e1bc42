"""Knowledge distillation from the baseline into the student as it stands: logits, and
optionally intermediate feature maps.

The student is whatever earlier stages left (pruned, fake-quantized, both or neither);
KD only changes its weights, never its deployed form. The teacher is the uncompressed
baseline, frozen in eval mode (Hinton et al., 2015).

Feature KD (``features:``) adds ``beta * sum_points L(student_i, teacher_i)`` where
``L`` is FitNets' MSE after a learned 1x1-conv adapter from the student's channels to the
teacher's (Romero et al., 2015; the adapter starts as the identity when the channel
counts match; for a transformer block's ``[N, tokens, dim]`` output a linear adapter over
``dim``) or attention transfer's distance between normalised spatial attention
maps (Zagoruyko & Komodakis, 2017; no adapter). Points default to the zoo net's
``default_exit_points`` plus its last block (``net.features.<i>``).

Getting feature maps:

- eager student and teacher: forward hooks on the modules at the points;
- PT2E graph student (after quantize): a graph has no submodules for its blocks, so the
  output node of each point is found by ``nn_module_stack`` (the last node, in graph
  order, recorded inside the block's module path) and an identity "tap" module is
  spliced in after it; the tap keeps its input for the loss and returns it unchanged.

Adapters are attached to the student only while the stage trains (so the optimizer
sees them) and are removed afterwards together with the taps: the exported artifact is
the same graph with or without feature KD.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from pqd.context import Context
from pqd.errors import RecipeError
from pqd.recipe import DistillSpec, FeatureKDSpec
from pqd.registry import register_stage
from pqd.state import State
from pqd.train import eval_mode, is_graph

TAPS = "_pqd_feature_taps"
TAP_PREFIX = "_pqd_feature_tap_"


def feature_points(teacher: nn.Module, spec: FeatureKDSpec) -> list[str]:
    """Module paths (in the teacher) where features are matched. Block indices and the
    default points need the early-exit protocol's ``features`` (an ``nn.Sequential``) and
    ``default_exit_points`` on the network: ``teacher.net`` of a Classifier, else the
    teacher itself."""
    inner = getattr(teacher, "net", None)
    root = "net." if isinstance(inner, nn.Module) else ""
    base = inner if root else teacher
    features = getattr(base, "features", None)
    if not isinstance(features, nn.Sequential):
        features = None
    if spec.points is None:
        exits = getattr(base, "default_exit_points", None) if features is not None else None
        if features is None or exits is None:
            raise RecipeError(
                f"distill.features: the model has no {root}features (nn.Sequential) with "
                "default_exit_points, so there are no default feature points",
                "list features.points as module names",
            )
        idx = sorted(set(exits) | {len(features) - 1})
        return [f"{root}features.{i}" for i in idx]
    names = []
    for p in spec.points:
        if isinstance(p, int):
            if features is None or not -len(features) <= p < len(features):
                n = 0 if features is None else len(features)
                raise RecipeError(
                    f"distill.features.points: no block {p} in {root}features ({n} blocks)",
                    "give block indices within range",
                )
            names.append(f"{root}features.{p % len(features)}")
        else:
            try:
                teacher.get_submodule(p)
            except AttributeError:
                raise RecipeError(
                    f"distill.features.points: the model has no module {p!r}",
                    "give module names such as net.features.3",
                ) from None
            names.append(p)
    return list(dict.fromkeys(names))


class _Tap(nn.Module):
    """Identity that keeps its input (the feature map at a point). It also owns the point's
    adapter, so the adapter trains with the student: the tap is part of the student (a
    graph keeps only submodules its code calls: torchao's train/eval switch deletes the
    others)."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None
        self.adapter: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.value = x
        return x

    def latest(self) -> torch.Tensor:
        """The input of the last forward (one has run)."""
        assert self.value is not None
        return self.value


def _module_path(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return str(list(stack.values())[-1][0]) if stack else None


def _output_node(graph: torch.fx.GraphModule, path: str) -> torch.fx.Node:
    """The last node computed inside module ``path`` (by ``nn_module_stack``): its output."""
    found = None
    for node in graph.graph.nodes:
        mod = _module_path(node)
        val = node.meta.get("val")
        if (
            node.op == "call_function"
            and mod is not None
            and (mod == path or mod.startswith(path + "."))
            and isinstance(val, torch.Tensor)
            and val.is_floating_point()
            and val.dim() >= 2
        ):
            found = node
    if found is None:
        raise RecipeError(
            f"distill.features: no node of module {path!r} in the student graph",
            "give feature points that exist in the model",
        )
    return found


@contextlib.contextmanager
def capture(model: nn.Module, points: list[str]) -> Iterator[dict[str, _Tap]]:
    """Taps holding the latest output at each point of ``model`` (eager or PT2E graph);
    everything added is removed on exit."""
    taps = {p: _Tap() for p in points}
    if is_graph(model):
        inserted = []
        for i, p in enumerate(points):
            node = _output_node(model, p)
            name = f"{TAP_PREFIX}{i}"
            model.add_submodule(name, taps[p])
            with model.graph.inserting_after(node):
                tap = model.graph.call_module(name, (node,))

            def not_the_tap(u: torch.fx.Node, t: torch.fx.Node = tap) -> bool:
                return u is not t

            node.replace_all_uses_with(tap, delete_user_cb=not_the_tap)
            inserted.append((node, tap, name))
        model.recompile()
        try:
            yield taps
        finally:
            for node, tap, name in inserted:
                tap.replace_all_uses_with(node)
                model.graph.erase_node(tap)
                model.delete_submodule(name)
            model.recompile()
    else:
        model.add_module(TAPS, nn.ModuleList(taps.values()))
        handles = []
        for p in points:
            try:
                mod = model.get_submodule(p)
            except AttributeError:
                raise RecipeError(
                    f"distill.features: the student has no module {p!r}",
                    "give feature points that exist in the student",
                ) from None
            handles.append(mod.register_forward_hook(lambda _m, _i, out, t=taps[p]: t.forward(out)))
        try:
            yield taps
        finally:
            for h in handles:
                h.remove()
            delattr(model, TAPS)


def _tokens(shape: torch.Size | tuple[int, ...]) -> bool:
    """A ``[N, tokens, dim]`` sequence (a transformer block's output) rather than a
    ``[N, C, H, W]`` map: its channels are the last axis."""
    return len(shape) == 3


def make_adapters(
    student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size], kind: str
) -> dict[str, nn.Module]:
    """Per point: a 1x1-conv adapter student channels -> teacher channels (``fitnet``;
    identity-initialised when the counts match), a linear one over the last axis for a
    token sequence ``[N, T, D]``, or ``nn.Identity`` (attention transfer)."""
    adapters: dict[str, nn.Module] = {}
    for p, s in student_shapes.items():
        t = teacher_shapes[p]
        tokens = _tokens(s) and _tokens(t)
        if (s[1:-1] != t[1:-1]) if tokens else (len(s) != len(t) or s[2:] != t[2:]):
            what = "token counts" if tokens else "spatial sizes"
            raise RecipeError(
                f"distill.features: at {p} the student's map is {list(s[1:])} and the "
                f"teacher's {list(t[1:])}; {what} must match",
                "choose feature points where student and teacher have the same resolution",
            )
        adapters[p] = nn.Identity()
        if kind == "fitnet":
            cs, ct = (s[-1], t[-1]) if tokens else (s[1], t[1])
            layer: nn.Linear | nn.Conv2d = (
                nn.Linear(cs, ct, bias=False) if tokens else nn.Conv2d(cs, ct, 1, bias=False)
            )
            if cs == ct:
                with torch.no_grad():
                    layer.weight.copy_(torch.eye(cs).view_as(layer.weight))
            adapters[p] = layer
    return adapters


def feature_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], adapters: list[nn.Module], kind: str
) -> torch.Tensor:
    """Sum over points of the FitNets MSE (after adapters) or the attention-transfer loss
    (a map's channels are its axis 1, a token sequence's its last axis)."""
    total = torch.zeros((), device=teacher[0].device)
    for s, t, adapter in zip(student, teacher, adapters, strict=True):
        s, t = s.float(), t.float().detach()
        if kind == "fitnet":
            total = total + F.mse_loss(adapter(s), t)
        else:
            dim = -1 if _tokens(s.shape) else 1
            at_s = F.normalize(s.pow(2).mean(dim).flatten(1))
            at_t = F.normalize(t.pow(2).mean(dim).flatten(1))
            total = total + (at_s - at_t).pow(2).mean()
    return total


@register_stage("distill")
def apply_distill(state: State, spec: DistillSpec, ctx: Context) -> State:
    """Fine-tune the student on ``alpha * KD + (1 - alpha) * CE`` (+ ``beta`` * feature KD)."""
    cfg = ctx.train
    loss = ctx.teacher_loss(spec.temperature, spec.alpha)
    if spec.features is None:
        ctx.fit(state, cfg, spec.epochs, seed=ctx.seed, loss_fn=loss, desc=ctx.desc)
        return state
    fspec = spec.features
    points = feature_points(ctx.teacher, fspec)
    beta = fspec.resolved_beta()
    student = state.model
    with capture(student, points) as s_taps, capture(ctx.teacher, points) as t_taps:
        x = ctx.example_input(4)
        with torch.no_grad(), eval_mode(student):
            student(x)
            ctx.teacher(x)
        adapters = make_adapters(
            {p: s_taps[p].latest().shape for p in points},
            {p: t_taps[p].latest().shape for p in points},
            fspec.loss,
        )
        for p in points:
            s_taps[p].adapter = adapters[p].to(ctx.device)
        # the per-step feature losses; checkpointed with each epoch (hook_state) for resume
        log: dict[str, list[float]] = {"history": []}

        def combined(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            base = loss(logits, y, x)  # runs the teacher: its taps fill
            feat = feature_loss(
                [s_taps[p].latest() for p in points],
                [t_taps[p].latest() for p in points],
                [s_taps[p].adapter for p in points],
                fspec.loss,
            )
            log["history"].append(float(feat.detach()))
            return base + beta * feat

        ctx.fit(
            state, cfg, spec.epochs, seed=ctx.seed, loss_fn=combined, desc=ctx.desc, hook_state=log
        )
    history = log["history"]
    n = max(1, len(history) // 10)
    state.info["feature_kd"] = {
        "points": points,
        "loss": fspec.loss,
        "beta": beta,
        "adapter_params": sum(p.numel() for a in adapters.values() for p in a.parameters()),
        "student_graph": is_graph(student),
        "steps": len(history),
        "feature_loss_first": sum(history[:n]) / n if history else None,
        "feature_loss_last": sum(history[-n:]) / n if history else None,
    }
    return state
