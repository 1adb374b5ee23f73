"""Lower a ``torch.nn.Module``'s forward onto duogard's backend ops (torch.fx).

The module is traced once per mode (eval / train) with ``torch.fx``'s symbolic tracer; every
node of the graph is mapped to a small function written against the backend contract
(``be.xp``, ``be.conv2d``, ``be.max_pool2d`` ...; the rules are in :mod:`.rules`). The
resulting :class:`LoweredGraph` runs on any backend: with JAX arrays it is differentiable by
``jax.jvp``/``jax.grad`` and jittable.

Every node is checked when the graph is lowered, so an unsupported op is reported together
with all the others of the graph (:class:`UnsupportedTorchOpsError`), each with its node name
and module path. A ``torch.autograd.Function`` is recorded as one opaque node (its custom
backward/jvp cannot be lowered) instead of being traced through.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from duogard.backend import backend

from .fx_modules import module_rule
from .helpers import (
    OpaqueFunction,
    Unsupported,
    UnsupportedTorchOpsError,
    describe,
    in_mode,
    module_path,
    real_cause,
    training_key,
)
from .registry import FxRule
from .rules import function_rules, method_rules

__all__ = ["LoweredGraph", "UnsupportedTorchOpsError", "lower_module", "trace"]


@dataclass
class _RunContext:
    be: Any
    key: Any
    params: dict

    def key_for(self, index: int, what: str):
        return training_key(self.be, self.key, index, what)


@dataclass
class _Step:
    index: int
    name: str
    op: str  # fx op kind
    fn: Callable | None  # fn(rt, index, *args, **kwargs); None for placeholder / output
    args: tuple
    kwargs: dict


class LoweredGraph:
    """A module's forward as a list of backend-neutral steps; call :meth:`run`.

    Attributes:
        path: ``"fx"`` (the export graph's is ``"export"``).
    """

    path = "fx"
    fallback_reason: str | None = None

    def __init__(self, steps: list[_Step], output_args, module_name: str):
        self.steps = steps
        self._output = output_args
        self.module_name = module_name

    def run(self, be, params: dict, x, *, key=None):
        """Evaluate the graph on backend ``be``.

        Args:
            be: the backend module whose ops to run.
            params: state_dict names to arrays of ``be``.
            x: the input, an array of ``be``.
            key: a key of ``be``; needed only by dropout in training mode.

        Returns:
            The module's output (arrays of ``be``, in the structure ``forward`` returns).
        """
        env: dict[str, Any] = {}
        rt = _RunContext(be, key, params)

        def value(node):
            return env[node.name]

        for step in self.steps:
            if step.op == "placeholder":
                env[step.name] = x if step.index == 0 else step.args[0]
            else:
                args = torch.fx.node.map_arg(step.args, value)
                kwargs = torch.fx.node.map_arg(step.kwargs, value)
                env[step.name] = step.fn(rt, step.index, *args, **kwargs)
        return torch.fx.node.map_arg(self._output, value)

    def run_with_state(self, be, params: dict, x, *, key=None):
        """:meth:`run`, and the buffers the forward updates: none on the fx path (batch norm in
        training mode with running statistics is not lowered there).

        Returns:
            ``(output, {})``.
        """
        return self.run(be, params, x, key=key), {}

    def __repr__(self) -> str:
        return f"LoweredGraph({self.module_name}, {len(self.steps)} steps)"


# ============================================================================ tracing


def _has_proxy(args) -> bool:
    found = []
    torch.fx.node.map_aggregate(args, lambda a: found.append(isinstance(a, torch.fx.Proxy)))
    return any(found)


def trace(module: nn.Module) -> torch.fx.Graph:
    """Symbolically trace ``module`` (in its current train/eval mode) into an fx Graph.

    ``torch.autograd.Function.apply`` is intercepted while tracing, so a custom Function is
    recorded as one node rather than silently inlined (its backward/jvp would be lost).

    Args:
        module: the torch module.

    Returns:
        The ``torch.fx.Graph`` of its forward.

    Raises:
        NotImplementedError: torch.fx cannot trace the forward (typically Python control flow
            on tensor values).
    """
    tracer = torch.fx.Tracer()
    original = torch.autograd.Function.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        if _has_proxy((args, kwargs)):
            return tracer.create_proxy("call_function", OpaqueFunction(cls), args, kwargs)
        return original.__func__(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)
    try:
        return tracer.trace(module)
    except Exception as exc:
        raise NotImplementedError(
            f"from_torch: torch.fx cannot trace {type(module).__name__}.forward, so it cannot run on "
            f"a non-torch backend ({real_cause(exc)}). {_trace_hint(exc)} On the torch backend "
            "the module runs as is."
        ) from exc
    finally:
        torch.autograd.Function.apply = original


def _trace_hint(exc: BaseException) -> str:
    """What typically raises this tracing error (only where the error says so)."""
    text = str(exc)
    if "control flow" in text or "iteration" in text.lower() or "__bool__" in text:
        return "Cause: Python control flow (if/while/for/bool) on tensor values."
    return (
        "Cause: the code at that location needs a concrete value where fx passes a symbolic proxy "
        "(e.g. torch.finfo(x.dtype), a tensor's dtype or device, int()/float() of a tensor, NumPy)."
    )


# ============================================================================ lowering


def _bind_check(rule: FxRule, node) -> None:
    if rule.check is None:
        params = list(inspect.signature(rule.fn).parameters.values())[2:]
        sig = inspect.Signature(params)
        try:
            sig.bind(*node.args, **node.kwargs)
        except TypeError as exc:
            raise Unsupported(f"arguments not understood: {exc}") from None
        return
    try:
        inspect.signature(rule.check).bind(*node.args, **node.kwargs)
    except TypeError as exc:
        raise Unsupported(f"arguments not understood: {exc}") from None
    rule.check(*node.args, **node.kwargs)


def lower_module(module: nn.Module, *, train: bool) -> LoweredGraph:
    """Trace ``module`` in train or eval mode and lower every node.

    Args:
        module: the torch module; its train/eval mode is restored afterwards.
        train: trace the training-mode forward (dropout active) or the eval-mode one.

    Returns:
        The :class:`LoweredGraph`.

    Raises:
        UnsupportedTorchOpsError: one error listing every op that cannot be lowered.
    """
    with in_mode(module, train):
        graph = trace(module)
        return _lower_graph(module, graph)


def _lower_graph(module: nn.Module, graph: torch.fx.Graph) -> LoweredGraph:
    fn_rules = function_rules()
    meth_rules = method_rules()
    state_names = set(module.state_dict().keys())
    steps, bad, bad_names, output, n_placeholders = [], [], set(), None, 0
    dropouts = 0  # the i-th active dropout draws from fold_in(key, i), as on the export path

    for index, node in enumerate(graph.nodes):
        try:
            if node.op == "placeholder":
                if n_placeholders > 0 and not node.args:
                    raise Unsupported(
                        "forward takes more than one required input; from_torch models take one input x"
                    )
                steps.append(_Step(n_placeholders, node.name, "placeholder", None, tuple(node.args), {}))
                n_placeholders += 1
            elif node.op == "get_attr":
                rule = _get_attr_rule(module, node.target, state_names)
                steps.append(_Step(index, node.name, "get_attr", rule, (), {}))
            elif node.op == "call_module":
                sub = module.get_submodule(node.target)
                mrule = module_rule(sub, node.target)
                if node.kwargs or len(node.args) != 1:
                    raise Unsupported("called with more than one argument")
                if type(sub) is nn.Dropout and sub.training and sub.p > 0:
                    index, dropouts = dropouts, dropouts + 1
                steps.append(
                    _Step(
                        index,
                        node.name,
                        "call_module",
                        lambda rt, i, x, _f=mrule: _f(rt, i, rt.params, x),
                        tuple(node.args),
                        {},
                    )
                )
            elif node.op in ("call_function", "call_method"):
                table = fn_rules if node.op == "call_function" else meth_rules
                try:
                    rule = table.get(node.target)
                except TypeError:  # unhashable target
                    rule = None
                if rule is None:
                    raise Unsupported(None)
                _bind_check(rule, node)
                if node.target is F.dropout and _is_training_dropout(node):
                    index, dropouts = dropouts, dropouts + 1
                steps.append(_Step(index, node.name, node.op, rule.fn, tuple(node.args), dict(node.kwargs)))
            elif node.op == "output":
                output = node.args[0]
        except Unsupported as exc:
            bad_names.add(node.name)
            source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
            if node.target is getattr and source is not None and source.name in bad_names:
                continue  # an attribute of an unsupported op's result (.values, .real): reported with it
            bad.append(_report(node, source, module, exc.args[0] if exc.args else None))

    if bad:
        raise UnsupportedTorchOpsError(type(module).__name__, bad)
    return LoweredGraph(steps, output, type(module).__name__)


def _is_training_dropout(node) -> bool:
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    return bool(training) and not (isinstance(p, (int, float)) and p == 0)


def _report(node, source, module: nn.Module, reason) -> tuple[str, str, str, str | None]:
    """(node name, op, module path, reason) of an unsupported node."""
    where = node
    if node.op == "call_module":
        cls = type(module.get_submodule(node.target))
        op = f"module {cls.__module__}.{cls.__qualname__}"
    elif node.target is getattr and len(node.args) == 2:
        op, reason = f"tensor attribute .{node.args[1]}", None
        if source is not None:
            reason = f"read from the output of node {source.name!r}"
    else:
        op = ("tensor method ." if node.op == "call_method" else "") + describe(node.target)
    return node.name, op, module_path(where, module), reason


def _get_attr_rule(module: nn.Module, target: str, state_names: set) -> Callable:
    if target in state_names:
        return lambda rt, i: rt.params[target]
    # a plain tensor attribute (not a parameter or buffer): a constant of the graph
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, torch.Tensor):
        raise Unsupported(f"attribute {target!r} of type {type(obj).__name__}")
    const = backend("torch").to_numpy(obj).copy()  # bfloat16 as ml_dtypes'
    return lambda rt, i: rt.be.asarray(const)
