"""Make torchao's PT2E prepare/convert/train-eval switches cheap: trace each pattern once,
on this machine, not once per process.

torchao 0.18 re-traces its small rewrite patterns with ``torch.export`` on every call:
``convert_pt2e`` traces 108 of them (conv1d, conv2d, conv_transpose1d/2d x 12 variants x
match/replacement), ``prepare_qat_pt2e`` about 20, and every ``move_exported_model_to_eval``
/ ``_train`` a few more: seconds per convert even for a 3-conv net, paid again by every
export and every train/eval switch (docs/install.md#caches has the figures).

:func:`install` (idempotent) wraps two private torchao functions:

- ``_get_aten_graph_module_for_pattern`` is memoised on what defines the traced graph (the
  pattern's code, its closure values, the example inputs' shapes and dtypes, ``is_cuda``,
  the kwargs); each call returns a deep copy, so the rewriter can never alter the cache;
- the conv-BN fuse/fold helpers skip a conv kind (e.g. ``conv_transpose1d``) absent from the
  graph, where they could match nothing anyway.

The memo lives in the process; every new process (each ``pqd run``, each worker of a search)
would trace the conv2d patterns again. So a traced pattern is also kept on disk, as the
``torch.export`` program it comes from (``torch.export.save``, not a pickle of the graph), in
:func:`pqd.cache.cache_dir` ``("pt2e-patterns")``, under a key that is stable across
processes: torch's and torchao's versions, the pattern function's bytecode and closure
values, the example inputs' shapes and dtypes, the kwargs. The program is the one torchao's
tracer exported (``torch.export.export`` is watched while it runs, so nothing is traced
twice); it is written only after it has been loaded back and has given exactly torchao's
graph, and a file that fails to load is traced again and replaced.
``PQD_PT2E_DISK_CACHE=0`` turns the disk layer off; both variables are read when the
patch is installed (the first prepare or convert of a process).

When the private names are missing (another torchao), nothing is patched and torchao runs
as it is.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import marshal
import os
import tempfile
import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pqd.cache import cache_dir

_installed = False
_WATCH = threading.Lock()
DISK_ENV = "PQD_PT2E_DISK_CACHE"
DISK_VERSION = 1
_CONV_OPS: dict[Callable[..., Any], set[Any]] = {}


def _describe(value: Any) -> Hashable:
    """A hashable description of an example input or kwarg (tensors by shape/dtype/device)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(_describe(v) for v in value))
    if isinstance(value, dict):
        return ("dict", *sorted((k, _describe(v)) for k, v in value.items()))
    hash(value)
    return value


def _pattern_key(pattern: Any) -> Hashable:
    """What decides the traced graph of ``pattern``: its function's code and closure values."""
    fn = getattr(pattern, "fn", pattern)  # torchao's WrapperModule keeps the function in .fn
    code = getattr(fn, "__code__", None)
    if code is None:
        raise TypeError("not a plain function")
    cells = tuple(_describe(c.cell_contents) for c in (fn.__closure__ or ()))
    defaults = tuple(_describe(d) for d in (fn.__defaults__ or ()))
    return (type(pattern), code, cells, defaults)


def _stable(value: Any) -> str:
    """A description of a closure value, default, example input or kwarg that is the same in
    every process (no object addresses); TypeError when there is none."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}{value.dtype}{value.device.type}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}[{','.join(_stable(v) for v in value)}]"
    if isinstance(value, dict):
        return "dict{" + ",".join(f"{k!r}:{_stable(v)}" for k, v in sorted(value.items())) + "}"
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return repr(value)
    if isinstance(value, torch._ops.OpOverload):
        return f"op:{value}"
    if callable(value) and getattr(value, "__qualname__", None):
        code = getattr(value, "__code__", None)
        body = hashlib.sha256(marshal.dumps(code)).hexdigest()[:16] if code else ""
        # a function made by a factory: what it captured decides what it does
        cells = [c.cell_contents for c in (getattr(value, "__closure__", None) or ())]
        inner = _stable([cells, list(getattr(value, "__defaults__", None) or ())])
        return f"fn:{getattr(value, '__module__', '')}.{value.__qualname__}:{body}:{inner}"
    raise TypeError(f"no stable description of {type(value).__name__}")


def disk_key(
    pattern: Any, example_inputs: tuple[Any, ...], is_cuda: bool, kwargs: dict[str, Any]
) -> str | None:
    """The on-disk name of a traced pattern (a hex digest), None when some part of what
    decides the graph has no description stable across processes."""
    import torchao

    fn = getattr(pattern, "fn", pattern)
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    try:
        parts = [
            f"v{DISK_VERSION}",
            torch.__version__,
            getattr(torchao, "__version__", "?"),
            type(pattern).__qualname__,
            fn.__qualname__,
            hashlib.sha256(marshal.dumps(code)).hexdigest(),
            _stable([c.cell_contents for c in (fn.__closure__ or ())]),
            _stable(list(fn.__defaults__ or ())),
            _stable(list(example_inputs)),
            repr(is_cuda),
            _stable(kwargs),
        ]
    except (TypeError, ValueError):  # ValueError: an empty closure cell
        return None
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _as_pattern(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The clean-up torchao's ``_get_aten_graph_module_for_pattern`` applies to
    ``ep.module()``: dead code out, the unused ``copy_`` nodes of mutated inputs out, and
    the input-guard call a loaded program adds (a pattern is matched, never run on inputs)."""
    gm.graph.eliminate_dead_code()
    gm.recompile()
    for node in list(gm.graph.nodes):
        copy_ = node.op == "call_function" and node.target == torch.ops.aten.copy_.default
        guards = node.op == "call_module" and node.name == "_guards_fn"
        if (copy_ or guards) and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _graph_text(gm: torch.fx.GraphModule) -> list[str]:
    return [f"{n.op} {n.name} {n.target} {n.args} {n.kwargs}" for n in gm.graph.nodes]


class PatternStore:
    """Traced patterns on disk as ``torch.export`` programs (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def load(self, key: str) -> torch.fx.GraphModule | None:
        """The stored pattern graph, None when absent or unreadable."""
        path = self.folder / f"{key}.pt2"
        if not path.is_file():
            return None
        try:
            return _as_pattern(torch.export.load(path).module())  # type: ignore[arg-type]
        except Exception:  # a broken cache file is traced again
            return None

    def save(self, key: str, program: Any, traced: torch.fx.GraphModule) -> bool:
        """Write ``program`` (the ``torch.export`` program torchao traced ``traced`` from)
        atomically, after checking that it loads back to ``traced`` node for node; True
        when written."""
        try:
            buf = io.BytesIO()
            torch.export.save(program, buf)
            buf.seek(0)
            back = _as_pattern(torch.export.load(buf).module())  # type: ignore[arg-type]
            if _graph_text(back) != _graph_text(traced):
                return False
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(buf.getvalue())
                os.replace(tmp, self.folder / f"{key}.pt2")
            finally:
                Path(tmp).unlink(missing_ok=True)
            return True
        except Exception:  # the disk layer is only ever a speed-up
            return False


def _trace_keeping_program(
    trace: Callable[..., torch.fx.GraphModule], *args: Any, **kwargs: Any
) -> tuple[torch.fx.GraphModule, Any]:
    """``trace(*args, **kwargs)`` (torchao's tracer) and the one program it exported on the
    way (None when it exported none or several): ``torch.export.export`` is watched for
    the call's duration, so the program is kept without exporting the pattern twice."""
    programs: list[Any] = []
    with _WATCH:  # one watch at a time: threads never restore each other's wrapper
        real = torch.export.export

        def watched(*a: Any, **k: Any) -> Any:
            program = real(*a, **k)
            programs.append(program)
            return program

        torch.export.export = watched  # type: ignore[assignment]
        try:
            gm = trace(*args, **kwargs)
        finally:
            torch.export.export = real  # type: ignore[assignment]
    return gm, programs[0] if len(programs) == 1 else None


def default_store() -> PatternStore | None:
    """The store in the user's cache folder; None when turned off (``PQD_PT2E_DISK_CACHE=0``)."""
    if os.environ.get(DISK_ENV, "1") == "0":
        return None
    return PatternStore(cache_dir("pt2e-patterns"))


def _memoised(
    trace: Callable[..., torch.fx.GraphModule], store: PatternStore | None = None
) -> Callable[..., torch.fx.GraphModule]:
    cache: dict[Hashable, torch.fx.GraphModule] = {}

    @functools.wraps(trace)
    def wrapper(
        pattern: Any, example_inputs: tuple[Any, ...], is_cuda: bool = False, **kwargs: Any
    ) -> torch.fx.GraphModule:
        try:
            key = (
                _pattern_key(pattern),
                _describe(tuple(example_inputs)),
                is_cuda,
                _describe(kwargs),
            )
        except TypeError:  # something unhashable: trace as torchao would
            return trace(pattern, example_inputs, is_cuda, **kwargs)
        if key not in cache:
            on_disk = (
                None
                if is_cuda or store is None
                else disk_key(pattern, example_inputs, is_cuda, kwargs)
            )
            gm = store.load(on_disk) if store is not None and on_disk else None
            if gm is None and store is not None and on_disk:
                gm, program = _trace_keeping_program(
                    trace, pattern, example_inputs, is_cuda, **kwargs
                )
                if program is not None:
                    store.save(on_disk, program, gm)
            elif gm is None:
                gm = trace(pattern, example_inputs, is_cuda, **kwargs)
            cache[key] = gm
        return copy.deepcopy(cache[key])

    wrapper.cache = cache  # type: ignore[attr-defined]
    return wrapper


def _skip_absent_convs(helper: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(helper)
    def wrapper(
        m: torch.fx.GraphModule, conv_fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        ops = _CONV_OPS.get(conv_fn)
        if ops is not None and not any(
            n.op == "call_function" and n.target in ops for n in m.graph.nodes
        ):
            return m
        return helper(m, conv_fn, *args, **kwargs)

    return wrapper


def install() -> bool:
    """Patch torchao's PT2E pattern tracing (once per process); True when patched."""
    global _installed
    if _installed:
        return True
    try:
        from torchao.quantization.pt2e import qat_utils, utils
    except ImportError:
        return False
    names = ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper")
    if not hasattr(utils, "_get_aten_graph_module_for_pattern") or not all(
        hasattr(qat_utils, n) for n in names
    ):
        return False
    aten = torch.ops.aten
    _CONV_OPS.update(
        {
            F.conv1d: {aten.conv1d.default, aten.conv1d.padding},
            F.conv2d: {aten.conv2d.default, aten.conv2d.padding},
            F.conv_transpose1d: {aten.conv_transpose1d.default},
            F.conv_transpose2d: {aten.conv_transpose2d.input},
        }
    )
    traced = _memoised(utils._get_aten_graph_module_for_pattern, default_store())
    utils._get_aten_graph_module_for_pattern = traced
    qat_utils._get_aten_graph_module_for_pattern = traced
    for name in names:
        setattr(qat_utils, name, _skip_absent_convs(getattr(qat_utils, name)))
    _installed = True
    return True
