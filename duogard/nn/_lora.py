"""LoRA: low-rank adapters on a model's Linear layers, the base weights frozen.

``lora(model, params, rank=r, alpha=a, targets=...)`` returns a model whose params are only
the adapters: for each targeted Linear layer ``y = x Wᵀ + b`` becomes
``y = x Wᵀ + b + (a / r) (x Aᵀ) Bᵀ`` with ``A`` (r, in) and ``B`` (out, r), and every base
weight (targeted or not) is a constant of the model. Any estimator, optimizer and update
strategy then sees the adapters only: a forward gradient perturbs ``r (in + out)`` numbers a
layer instead of ``in · out``, and a step's memory is the adapters' and inference's.

The adapters are made by the model's ``init`` from a seed in NumPy, as every duogard layer's
params are: ``A`` as torch.nn.Linear's weight (``U(-1/√in, 1/√in)``, PEFT's Kaiming-uniform
default), ``B`` zeros, so the adapted model starts as the base model, exactly.

Written here for a :class:`~duogard.nn.Sequential` of duogard layers (its Linear layers named
by their path in the params, ``"0"``, ``"2"``, ``"1.0"`` for a nested Sequential); a ported
torch module (``duogard.from_torch``) adapts its ``torch.nn.Linear`` (and Hugging Face
``Conv1D``) submodules the same way, named by module path (its ``with_lora``).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from duogard.backend import backend_of
from duogard.nn._linear import Linear, _positive_int, uniform_init
from duogard.nn._module import Module, Sequential, init_rng
from duogard.tree import flatten_dict, tree_leaves, tree_map, unflatten_dict

__all__ = [
    "LoRA",
    "Frozen",
    "LoRALinear",
    "LoRASequential",
    "folded",
    "init_adapters",
    "lora",
    "lora_options",
    "select_targets",
]


# ============================================================================ the shared parts


@dataclass(frozen=True)
class LoRA:
    """What an adapted model adapts (its ``.lora``): the targeted Linear layers' names, in model
    order, the adapters' rank and alpha; the update is ``scale · B A`` with ``scale = alpha / rank``.
    """

    targets: tuple[str, ...]
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def names(self) -> tuple[str, ...]:
        """The adapters' flat param names: ``"<target>.lora_A"``, ``"<target>.lora_B"`` for each."""
        return tuple(f"{t}.lora_{p}" if t else f"lora_{p}" for t in self.targets for p in "AB")


def lora_options(rank, alpha, targets) -> tuple[int, float, tuple[str, ...]]:
    """``(rank, alpha, patterns)`` checked; ``alpha`` None is ``rank`` (scale 1).

    ``targets`` is an fnmatch pattern (``"*.q_proj"``; ``|`` separates alternatives:
    ``"*.q_proj|*.v_proj"``) or a sequence of them.

    Raises:
        ValueError: ``rank`` not a positive int, ``alpha`` not a finite number > 0, ``targets``
            empty.
        TypeError: ``targets`` neither a str nor a sequence of str.
    """
    rank = _positive_int("lora", "rank", rank)
    if alpha is None:
        alpha = rank
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise ValueError(f"lora: alpha must be a number > 0, got {alpha!r}")
    if not (0 < float(alpha) < math.inf):
        raise ValueError(f"lora: alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(targets, str):
        patterns = tuple(p.strip() for p in targets.split("|"))
    elif isinstance(targets, Sequence) and all(isinstance(p, str) for p in targets):
        patterns = tuple(p.strip() for p in targets)
    else:
        raise TypeError(
            f"lora: targets must be an fnmatch pattern (a str, '|' between alternatives) or a list of "
            f"them, got {type(targets).__name__}"
        )
    if not patterns or not all(patterns):
        raise ValueError(f"lora: targets must name at least one pattern and no empty one, got {targets!r}")
    return rank, float(alpha), patterns


def select_targets(names: Sequence[str], patterns: Sequence[str], *, what: str) -> tuple[str, ...]:
    """The ``names`` (Linear layers, in model order) that match any of ``patterns`` (fnmatch,
    case-sensitive, on the whole name).

    Raises:
        ValueError: a pattern matches no name (a typo would otherwise adapt fewer layers than
            asked, silently); the message lists the Linear layers there are.
    """
    names = list(names)
    if not names:
        raise ValueError(f"lora: {what} has no Linear layer to adapt")
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            shown = ", ".join(repr(n) for n in names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(
                f"lora: targets pattern {pattern!r} matches no Linear layer of {what}; "
                f"its Linear layers are {shown} (patterns are fnmatch on the whole name: '*.{pattern}' "
                "matches it at any depth)"
            )
    return tuple(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))


def init_adapters(rng: np.random.Generator, shapes: dict, rank: int, dtype) -> dict:
    """``{name: (A, B)}`` for ``shapes = {name: (out, in)}``, in order: ``A`` (rank, in) as
    torch.nn.Linear's weight, ``U(-1/√in, 1/√in)``; ``B`` (out, rank) zeros.

    Each ``A`` is drawn from a generator seeded by one draw of ``rng``, not from ``rng`` itself:
    the base model's init from the same seed would otherwise give ``A`` its weight's first rows.
    """
    out = {}
    for name, (n_out, n_in) in shapes.items():
        own = np.random.Generator(np.random.PCG64(int(rng.integers(0, 2**63))))
        a = uniform_init(own, (rank, n_in), n_in, dtype)
        out[name] = (a, np.zeros((n_out, rank), dtype))
    return out


def folded(weight, a, b, scale: float, *, transposed: bool = False) -> np.ndarray:
    """``weight + scale · B A`` in NumPy (``weight`` (out, in); ``transposed``: it is (in, out),
    as Hugging Face's ``Conv1D`` holds it), summed in float64 and returned in ``weight``'s dtype.
    """
    w = np.asarray(weight)
    delta = float(scale) * (np.asarray(b, np.float64) @ np.asarray(a, np.float64))
    return (w.astype(np.float64) + (delta.T if transposed else delta)).astype(w.dtype)


def _numpy_copy(a) -> np.ndarray:
    """A NumPy copy of an array of any backend (the base weights become the model's constants)."""
    if isinstance(a, (np.ndarray, np.generic)):
        return np.array(a, copy=True)
    return np.array(backend_of(a).to_numpy(a), copy=True)


class _Constants:
    """A NumPy tree placed on a backend once per backend and device (never inside a trace:
    there the arrays are the program's constants).
    """

    def __init__(self, tree):
        self.tree = tree
        self._placed: dict = {}

    def on(self, be, like):
        device = be.device_of(like)
        key = (be.name, repr(device))
        got = self._placed.get(key)
        if got is None:
            got = tree_map(lambda a: be.asarray(a, device=device), self.tree)
            if not any(be.is_tracing(a) for a in tree_leaves(got)):
                self._placed[key] = got
        return got


# ============================================================================ the layers


class Frozen(Module):
    """A layer with its params held as constants: it has no params of its own to train.

    Args:
        layer: the layer.
        params: its params (arrays of any backend, or NumPy: copied to NumPy).
        name: its path in the model (in the repr: two frozen layers alike but for their
            weights are told apart).
    """

    has_params = False

    def __init__(self, layer: Module, params: dict, *, name: str = ""):
        self.layer = layer
        self.name = str(name)
        self.params = tree_map(_numpy_copy, params)
        self._constants = _Constants(self.params)

    @property
    def has_train_mode(self) -> bool:  # type: ignore[override]
        return self.layer.has_train_mode

    def init_params(self, rng, input_shape, dtype):
        # the layer's own init on a generator of its own (the caller's draws stay the adapters'),
        # for the output shape and to check that the frozen params fit this input
        made, out = self.layer.init_params(init_rng(0), tuple(input_shape), dtype)
        _check_shapes(self.name, made, self.params)
        return {}, tuple(out)

    def constants(self, be, like):
        """The frozen params on ``like``'s backend and device."""
        return self._constants.on(be, like)

    def forward(self, be, params, x, *, key=None, train=False):
        return self.layer.forward(be, self.constants(be, x), x, key=key, train=train)

    def __repr__(self) -> str:
        return f"Frozen({self.layer!r}, name={self.name!r})"


class LoRALinear(Module):
    """A Linear layer with frozen weights and a trainable low-rank update:
    ``y = x Wᵀ + b + (alpha / rank) (x Aᵀ) Bᵀ``; params ``{"lora_A": (rank, in), "lora_B":
    (out, rank)}``.

    Args:
        linear: the base :class:`Linear` layer.
        params: its ``{"weight", "bias"}`` (copied to NumPy, frozen).
        rank: the adapters' rank.
        alpha: the scale's numerator (the scale is ``alpha / rank``).
        name: its path in the model.
    """

    def __init__(self, linear: Linear, params: dict, *, rank: int, alpha: float, name: str = ""):
        if not isinstance(linear, Linear):
            raise TypeError(f"LoRALinear: expected a duogard.nn.Linear, got {type(linear).__name__}")
        self.linear = linear
        self.rank = _positive_int("LoRALinear", "rank", rank)
        self.alpha = float(alpha)
        self.scale = self.alpha / self.rank
        self.name = str(name)
        self.frozen = tree_map(_numpy_copy, params)
        self._constants = _Constants(self.frozen)
        self.down = Linear(self.rank, bias=False)  # x Aᵀ
        self.up = Linear(linear.out_features, bias=False)  # h Bᵀ

    @property
    def in_features(self) -> int:
        return int(self.frozen["weight"].shape[1])

    def init_params(self, rng, input_shape, dtype):
        made, out = self.linear.init_params(init_rng(0), tuple(input_shape), dtype)
        _check_shapes(self.name, made, self.frozen)
        shapes = {self.name: (self.linear.out_features, self.in_features)}
        ((a, b),) = init_adapters(rng, shapes, self.rank, dtype).values()
        return {"lora_A": a, "lora_B": b}, tuple(out)

    def constants(self, be, like):
        """The frozen ``{"weight", "bias"}`` on ``like``'s backend and device."""
        return self._constants.on(be, like)

    def forward(self, be, params, x, *, key=None, train=False):
        y = self.linear.forward(be, self.constants(be, x), x)
        h = self.down.forward(be, {"weight": params["lora_A"]}, x) * self.scale
        return y + self.up.forward(be, {"weight": params["lora_B"]}, h)

    def __repr__(self) -> str:
        return (
            f"LoRALinear({self.linear.out_features}, rank={self.rank}, alpha={self.alpha:g}, "
            f"bias={self.linear.bias}, name={self.name!r})"
        )


def _check_shapes(name: str, made: dict, given: dict) -> None:
    want = flatten_dict(made) if isinstance(made, dict) else {}
    have = flatten_dict(given) if isinstance(given, dict) else {}
    if set(want) != set(have) or any(tuple(np.shape(have[k])) != tuple(np.shape(want[k])) for k in want):
        shapes = lambda d: {k: tuple(np.shape(v)) for k, v in d.items()}  # noqa: E731
        raise ValueError(
            f"lora: the frozen params of layer {name!r} are {shapes(have)}, but for this input the "
            f"layer has {shapes(want)}: the example input does not fit the base params"
        )


# ============================================================================ the model


class LoRASequential(Sequential):
    """A :class:`Sequential` whose targeted Linear layers are :class:`LoRALinear` and whose other
    layers with params are :class:`Frozen` (made by :func:`lora`). Its params are the adapters,
    nested like the base model's: ``{"2": {"lora_A", "lora_B"}}``.

    Attributes:
        lora: what it adapts (:class:`LoRA`: targets, rank, alpha, scale).
        base: the base model.
        base_params: its params (NumPy copies, frozen).
    """

    def __init__(self, layers, *, base, base_params, lora: LoRA):
        super().__init__(*layers)
        self.base, self.base_params, self.lora = base, base_params, lora

    def merge(self, adapters) -> dict:
        """The base model's params with the adapters folded in, ``W + (alpha/rank) B A`` (NumPy):
        ``base.apply(model.merge(adapters), x)`` computes what ``model.apply(adapters, x)`` does,
        in one product a layer (to export, or to train further without adapters).
        """
        flat = flatten_dict(self.base_params)
        given = flatten_dict(adapters) if isinstance(adapters, dict) else None
        if given is None or set(given) != set(self.lora.names):
            raise KeyError(
                f"LoRASequential.merge: adapters must be this model's params {sorted(self.lora.names)}, "
                f"got {type(adapters).__name__ if given is None else sorted(given)}"
            )
        for t in self.lora.targets:
            a, b = _numpy_copy(given[f"{t}.lora_A"]), _numpy_copy(given[f"{t}.lora_B"])
            flat[f"{t}.weight"] = folded(flat[f"{t}.weight"], a, b, self.lora.scale)
        return unflatten_dict({k: np.array(v, copy=True) for k, v in flat.items()})

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        head = f"rank={self.lora.rank}, alpha={self.lora.alpha:g}, targets={list(self.lora.targets)}"
        return f"LoRASequential({head},\n  {inner}\n)"


def _linear_names(model: Sequential, params: dict, prefix: str = "") -> list[str]:
    names = []
    for i, layer in enumerate(model.layers):
        name, p = f"{prefix}{i}", params.get(str(i))
        if not p:
            continue
        if isinstance(layer, Linear):
            names.append(name)
        elif type(layer) is Sequential:  # not a Local block (a Sequential with heads): frozen whole
            names += _linear_names(layer, p, name + ".")
    return names


def _adapt(model: Sequential, params: dict, targets: set, rank: int, alpha: float, prefix: str = "") -> list:
    layers = []
    for i, layer in enumerate(model.layers):
        name, p = f"{prefix}{i}", params.get(str(i))
        if not p:  # no params (activations, pooling; LayerNorm without affine)
            layers.append(layer)
        elif isinstance(layer, Linear) and name in targets:
            layers.append(LoRALinear(layer, p, rank=rank, alpha=alpha, name=name))
        elif any(t.startswith(name + ".") for t in targets):  # a nested Sequential with targets
            layers.append(Sequential(*_adapt(layer, p, targets, rank, alpha, name + ".")))
        else:
            layers.append(Frozen(layer, p, name=name))
    return layers


def _adapt_sequential(model: Sequential, params, rank: int, alpha: float, patterns) -> LoRASequential:
    if params is None:
        raise ValueError(
            "lora: params (the base model's weights: model.init(seed, x), or trained ones) are needed "
            "to adapt a Sequential"
        )
    if not isinstance(params, dict):
        raise TypeError(
            f"lora: params must be the base model's nested dict of arrays, got {type(params).__name__}"
        )
    base_params = tree_map(_numpy_copy, params)
    names = _linear_names(model, base_params)
    targets = select_targets(names, patterns, what=f"the Sequential (params {sorted(base_params)})")
    layers = _adapt(model, base_params, set(targets), rank, alpha)
    return LoRASequential(layers, base=model, base_params=base_params, lora=LoRA(targets, rank, alpha))


def lora(model, params=None, *, rank: int, alpha: float | None = None, targets: str | Sequence[str] = "*"):
    """A model that trains LoRA adapters on ``model``'s Linear layers, its weights frozen.

    Each targeted Linear layer computes ``x Wᵀ + b + (alpha / rank) (x Aᵀ) Bᵀ``; ``W``, ``b``
    and every other base weight are constants of the new model, whose params are only the
    adapters ``A`` (rank, in) and ``B`` (out, rank). Make them with the new model's ``init(seed,
    example_input)`` (NumPy: ``A`` as torch.nn.Linear's weight, ``B`` zeros, so the model starts
    as the base, exactly) and train them with ``fit`` and any weight-space estimator.

    Args:
        model: a :class:`Sequential` of duogard layers (its Linear layers are named by their path
            in the params: ``"0"``, ``"2"``, ``"1.0"`` inside a nested Sequential), or a ported
            torch module (``duogard.from_torch``: its ``torch.nn.Linear`` and Hugging Face
            ``Conv1D`` submodules, named by module path, ``"transformer.h.0.attn.c_attn"``), or
            any model with a ``with_lora(params, rank=, alpha=, targets=)`` method.
        params: the base weights (required for a Sequential; a ported model defaults to its
            own, and takes trained ones to start from).
        rank: the adapters' rank (a positive int).
        alpha: the scale's numerator: the update is ``(alpha / rank) B A`` (default ``rank``:
            scale 1).
        targets: which Linear layers to adapt: an fnmatch pattern matched against each layer's
            whole name (``"*"``: all; ``"*.q_proj|*.v_proj"``: ``|`` between alternatives) or a
            list of patterns.

    Returns:
        The adapted model: ``.init(seed, x)`` gives the adapters, ``.apply(adapters, x)`` runs
        it, ``.merge(adapters)`` folds them into the base weights (the base model's params),
        ``.lora`` (a :class:`LoRA`) names the adapted layers (``.lora.targets``), the rank,
        alpha and scale.

    Raises:
        ValueError: ``rank`` not a positive int, ``alpha`` not a number > 0, a pattern of
            ``targets`` matching no Linear layer (the message lists them), missing ``params``
            for a Sequential.
        TypeError: a model that cannot be adapted.
    """
    rank, alpha, patterns = lora_options(rank, alpha, targets)
    if getattr(model, "lora", None) is not None:
        raise TypeError("lora: model is adapted already; merge its adapters first (model.merge(adapters))")
    if isinstance(model, Sequential):
        return _adapt_sequential(model, params, rank, alpha, patterns)
    hook = getattr(model, "with_lora", None)
    if callable(hook):
        return hook(params, rank=rank, alpha=alpha, targets=patterns)
    raise TypeError(
        f"lora: model must be a duogard.nn.Sequential, a ported torch module (duogard.from_torch) or a "
        f"model with a with_lora method, got {type(model).__name__}"
    )
