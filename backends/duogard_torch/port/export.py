"""Lower a ``torch.nn.Module`` through ``torch.export``: capture, graph signature, run.

:func:`capture` exports the module's forward (non-strict) for one example input and decomposes
it to the core ATen operator set; :func:`lower_exported` maps every node to a rule of
:mod:`.aten` and returns an :class:`ExportedGraph`, which runs on any backend:

- parameters and buffers are graph inputs, read from the ``params`` dict (keyed like the
  module's ``state_dict``); constants (non-persistent buffers, tensor attributes) are kept in
  NumPy;
- buffer mutations (batch norm's running statistics in training mode) are graph outputs:
  :meth:`ExportedGraph.run_with_state` returns them as new arrays, nothing is mutated;
- the i-th random node of the graph (``native_dropout``, ``bernoulli.p``/``.Tensor``, ``rand``,
  attention with dropout) draws from ``fold_in(key, i)``.

Every node is checked when the graph is lowered: unsupported operators (and custom
``torch.autograd.Function`` calls, whose own backward/jvp cannot be lowered) are reported
together in one :class:`~duogard_torch.port.helpers.UnsupportedTorchOpsError`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from duogard.backend import backend

from .aten import op_name, rules
from .helpers import (
    Unsupported,
    UnsupportedTorchOpsError,
    dtype_of,
    in_mode,
    module_path,
    module_path_root,
    real_cause,
)
from .registry import NodeInfo, Run

__all__ = ["KEPT", "ExportCaptureError", "ExportedGraph", "capture", "lower_exported"]

#: operators the capture keeps whole instead of decomposing (each has a rule of its own):
#: ``scaled_dot_product_attention``, whose decomposition breaks the views export recorded after
#: it with the fused kernel's strides (:mod:`.aten.attention`)
KEPT = (torch.ops.aten.scaled_dot_product_attention.default,)


class ExportCaptureError(RuntimeError):
    """``torch.export`` could not capture the forward; ``cause`` is the original exception."""

    def __init__(self, module_name: str, cause: BaseException):
        self.cause = cause
        super().__init__(f"torch.export cannot capture {module_name}.forward: {real_cause(cause)}")


# ============================================================================ capture


class _Recorder:
    """Module paths while tracing, and the custom autograd Functions called under them."""

    def __init__(self, module: nn.Module):
        self.stack: list[str] = []
        self.functions: list[tuple[type, str]] = []
        self.handles = []
        for name, sub in module.named_modules():
            self.handles.append(sub.register_forward_pre_hook(lambda m, a, _n=name: self.stack.append(_n)))
            self.handles.append(sub.register_forward_hook(self._pop))

    def _pop(self, module, args, output):
        self.stack.pop()

    def close(self):
        for h in self.handles:
            h.remove()


def capture(module: nn.Module, example: torch.Tensor, *, train: bool):
    """Export ``module``'s forward on ``example`` (non-strict) and decompose it to core ATen.

    Batch norm layers with ``momentum=None`` (a cumulative average, which export cannot trace:
    it reads ``num_batches_tracked`` as a Python number) are exported with a placeholder
    momentum; :func:`lower_exported` computes the cumulative factor from the buffer instead.
    The module's mode, momenta and state are restored afterwards.

    Args:
        module: the torch module.
        example: an input of the shape and dtype the graph is for.
        train: export the training-mode forward or the eval-mode one.

    Returns:
        ``(exported_program, functions)``: the decomposed ``ExportedProgram`` and the custom
        ``torch.autograd.Function`` classes called while tracing, with their module paths.

    Raises:
        ExportCaptureError: export failed (its ``cause`` is the original exception).
    """
    recorder = _Recorder(module)
    cumulative = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None and m.track_running_stats
    ]
    original = torch.autograd.Function.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        recorder.functions.append((cls, recorder.stack[-1] if recorder.stack else ""))
        return original.__func__(cls, *args, **kwargs)

    for m in cumulative:
        m.momentum = 0.1
    torch.autograd.Function.apply = classmethod(apply)
    try:
        with in_mode(module, train):
            ep = torch.export.export(module, (example,), strict=False)
            ep = ep.run_decompositions(_decompositions())
    except Exception as exc:
        raise ExportCaptureError(type(module).__name__, exc) from exc
    finally:
        torch.autograd.Function.apply = original
        for m in cumulative:
            m.momentum = None
        recorder.close()
    return ep, recorder.functions


def _decompositions() -> dict:
    """The core ATen decompositions, less those of the operators lowered whole (:data:`KEPT`)."""
    table = torch.export.default_decompositions()
    for op in KEPT:
        table.pop(op, None)
    return table


# ============================================================================ the lowered graph


@dataclass
class _Step:
    name: str
    op: Any
    fn: Any
    info: NodeInfo
    args: tuple
    kwargs: dict


class ExportedGraph:
    """A module's exported forward as backend-neutral steps; call :meth:`run`.

    Attributes:
        path: ``"export"`` (the fx graph's is ``"fx"``).
        module_name: the module's class name.
        buffer_outputs: the state_dict names of the buffers the forward updates (batch norm's
            running statistics in training mode).
    """

    path = "export"

    def __init__(self, module_name, inputs, steps, user_outputs, buffer_outputs, out_spec):
        self.module_name = module_name
        self._inputs = inputs  # (placeholder name, kind, target or constant)
        self.steps = steps
        self._user_outputs = user_outputs
        self._buffer_outputs = buffer_outputs  # (state_dict name, output node or constant)
        self._out_spec = out_spec
        self.buffer_outputs = tuple(name for name, _ in buffer_outputs)

    def _evaluate(self, be, params, x, key):
        rt = Run(be, key, be.device_of(x), params)
        env: dict[str, Any] = {}
        for name, kind, target in self._inputs:
            if kind == "input":
                env[name] = x
            elif kind == "param":
                env[name] = params[target]
            else:  # a constant, NumPy
                env[name] = be.asarray(target, **({} if rt.device is None else {"device": rt.device}))

        def value(node):
            return env[node.name]

        narrowed = _narrowed(be)
        for step in self.steps:
            wide = step.info.extra.get("wide")
            if wide and wide[0] in narrowed:
                raise TypeError(
                    f"from_torch: node {step.name!r} ({op_name(step.op)}) in module {wide[1]} of "
                    f"{self.module_name} computes a result of dtype {wide[0]}, which {be.name} would "
                    f"silently compute as {narrowed[wide[0]]} (its 64-bit mode is off). Enable it before any "
                    "computation (jax.config.update('jax_enable_x64', True), or JAX_ENABLE_X64=1), "
                    "or compute in 32 bits in the module"
                )
            args = torch.fx.node.map_arg(step.args, value)
            kwargs = torch.fx.node.map_arg(step.kwargs, value)
            env[step.name] = step.fn(rt, step.info, *args, **kwargs)
        user = [torch.fx.node.map_arg(o, value) for o in self._user_outputs]
        out = pytree.tree_unflatten(user, self._out_spec)
        state = {name: torch.fx.node.map_arg(node, value) for name, node in self._buffer_outputs}
        return out, state

    def run(self, be, params: dict, x, *, key=None):
        """Evaluate the graph on backend ``be``.

        Args:
            be: the backend module whose ops to run.
            params: state_dict names to arrays of ``be`` (parameters and buffers).
            x: the input, an array of ``be``.
            key: a key of ``be``; needed only by dropout in training mode.

        Returns:
            The module's output (arrays of ``be``, in the structure ``forward`` returns).
        """
        return self._evaluate(be, params, x, key)[0]

    def run_with_state(self, be, params: dict, x, *, key=None):
        """Evaluate the graph, and return the buffers it updates as new arrays.

        Returns:
            ``(output, new_buffers)``: ``new_buffers`` maps state_dict names (``"bn.running_mean"``,
            ``"bn.num_batches_tracked"`` ...) to new arrays of ``be``; ``params`` is unchanged.
        """
        return self._evaluate(be, params, x, key)

    def __repr__(self) -> str:
        return f"ExportedGraph({self.module_name}, {len(self.steps)} steps)"


def _python_spelling(node) -> str | None:
    """``torch.fft.fft`` / ``Tensor.abs`` ... from export's ``torch_fn`` metadata."""
    meta = node.meta.get("torch_fn")
    if not meta or len(meta) < 2:
        return None
    kind, _, name = str(meta[1]).rpartition(".")
    if kind == "method_descriptor":
        return f"Tensor.{name}"
    if hasattr(torch.nn.functional, name) and not hasattr(torch, name):
        return f"torch.nn.functional.{name}"
    if hasattr(torch, name):
        return f"torch.{name}"
    prefix, _, rest = name.partition("_")
    if prefix in ("fft", "linalg", "special") and hasattr(getattr(torch, prefix), rest):
        return f"torch.{prefix}.{rest}"
    return name


def _result_dtypes(node) -> list:
    """The torch dtypes of a node's tensor results, as export recorded them."""
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    return [v.dtype for v in vals if isinstance(v, torch.Tensor)]


def _is_counter(node) -> bool:
    """``buffer + 1``: batch norm's ``num_batches_tracked`` (2**31 steps from leaving int32)."""
    return (
        node.target in (torch.ops.aten.add.Tensor, torch.ops.aten.add.Scalar)
        and len(node.args) == 2
        and getattr(node.args[0], "op", None) == "placeholder"
        and node.args[1] == 1
    )


def _narrowed(be) -> dict:
    """The 64-bit torch dtypes ``be`` computes in fewer bits (JAX without its 64-bit mode), to
    what it computes them as.
    """
    out = {}
    for name in ("float64", "int64", "complex128"):
        got = str(dtype_of(be, getattr(torch, name))).removeprefix("torch.")
        if got != name:
            out[name] = got
    return out


#: the random operators: the i-th of them in the graph draws from ``fold_in(key, i)``
_DRAWS = (
    torch.ops.aten.native_dropout.default,
    torch.ops.aten.bernoulli.p,
    torch.ops.aten.bernoulli.Tensor,
    torch.ops.aten.rand.default,
)


def _attention_dropout(node) -> bool:
    """An attention node with dropout on its weights: it takes the next dropout index."""
    if node.target is not torch.ops.aten.scaled_dot_product_attention.default:
        return False
    p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
    return float(p) > 0


def _used_outputs(node) -> set:
    return {u.args[1] for u in node.users if u.op == "call_function" and u.target is operator.getitem}


def lower_exported(module: nn.Module, ep, functions=()) -> ExportedGraph:
    """Lower every node of an exported program (:func:`capture`) onto duogard's backend ops.

    Args:
        module: the module that was exported (for module paths and batch norm settings).
        ep: its decomposed ``ExportedProgram``.
        functions: the custom autograd Functions :func:`capture` saw, reported as unsupported.

    Returns:
        The :class:`ExportedGraph`.

    Raises:
        UnsupportedTorchOpsError: one error listing every operator that cannot be lowered,
            with node names and module paths.
    """
    table = rules()
    state_names = set(module.state_dict().keys())
    sig = ep.graph_signature
    bad: list[tuple[str, str, str, str | None]] = []
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    inputs = []
    n_user = 0
    for node, spec in zip(placeholders, sig.input_specs):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target in state_names:
            inputs.append((node.name, "param", spec.target))
        elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR, InputKind.PARAMETER):
            const = ep.constants.get(spec.target, ep.state_dict.get(spec.target))
            inputs.append((node.name, "const", _numpy(const)))
        elif spec.kind == InputKind.USER_INPUT:
            if n_user:
                bad.append((node.name, "a second input", "''", "from_torch models take one input x"))
            inputs.append((node.name, "input", None))
            n_user += 1
        else:
            bad.append((node.name, f"graph input of kind {spec.kind.name}", "''", None))

    steps, dropouts = [], 0
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        dtypes = _result_dtypes(node)
        info = NodeInfo(node.name, _path(node), _used_outputs(node), dtype=dtypes[0] if dtypes else None)
        rule = table.get(node.target)
        try:
            if rule is None:
                raise Unsupported(None)
            if node.target in _DRAWS or _attention_dropout(node):
                info.extra["dropout_index"] = dropouts
                dropouts += 1
            if node.target is torch.ops.aten._native_batch_norm_legit_functional.default:
                _cumulative(module, info, state_names)
            if rule.check is not None:
                rule.check(node, info)
        except Unsupported as exc:
            spelling = _python_spelling(node)
            op = op_name(node.target) + (f" (from {spelling})" if spelling else "")
            bad.append((node.name, op, _where(node, module), exc.args[0] if exc.args else None))
            continue
        wide = [
            d for d in dtypes if d.itemsize == 8 and (d.is_floating_point or d.is_complex or not rule.bounded)
        ]
        if wide and not _is_counter(node):
            info.extra["wide"] = (str(wide[0]).removeprefix("torch."), _where(node, module))
        steps.append(_Step(node.name, node.target, rule.fn, info, tuple(node.args), dict(node.kwargs)))

    for cls, path in dict.fromkeys(functions):
        where = (
            f"{path!r} ({type(module.get_submodule(path)).__name__})" if path else module_path_root(module)
        )
        bad.append(
            (
                f"{cls.__name__}.apply",
                f"custom torch.autograd.Function {cls.__module__}.{cls.__qualname__}",
                where,
                "its own backward/jvp cannot be lowered",
            )
        )

    output_node = next(n for n in ep.graph.nodes if n.op == "output")
    outs = list(output_node.args[0])
    user_outputs, buffer_outputs = [], []
    for value, spec in zip(outs, sig.output_specs):
        if spec.kind == OutputKind.USER_OUTPUT:
            user_outputs.append(value)
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            buffer_outputs.append((spec.target, value))
        else:
            what = (
                "modifies its input in place"
                if spec.kind == OutputKind.USER_INPUT_MUTATION
                else spec.kind.name
            )
            bad.append((getattr(value, "name", "output"), f"graph output ({what})", "''", None))
    if bad:
        raise UnsupportedTorchOpsError(type(module).__name__, bad)
    return ExportedGraph(
        type(module).__name__, inputs, steps, user_outputs, buffer_outputs, ep.call_spec.out_spec
    )


def _where(node, module) -> str:
    """The module path of a node: ``'enc.inner' (_Inner)``, or the root."""
    return module_path(node, module) if _path(node) else module_path_root(module)


def _path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _cumulative(module, info: NodeInfo, state_names) -> None:
    """Batch norm with ``momentum=None``: the factor is 1 / (num_batches_tracked + 1)."""
    try:
        sub = module.get_submodule(info.path)
    except AttributeError:
        return
    counter = f"{info.path}.num_batches_tracked" if info.path else "num_batches_tracked"
    if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.momentum is None and counter in state_names:
        info.extra["cumulative"] = counter


def _numpy(value):
    if isinstance(value, torch.Tensor):
        return backend("torch").to_numpy(value).copy()  # bfloat16 as ml_dtypes'
    return np.asarray(value)
