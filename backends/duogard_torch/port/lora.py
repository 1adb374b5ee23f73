"""LoRA adapters on a torch module's Linear submodules (:meth:`TorchModel.with_lora`).

The adapters are registered on a copy of the module (its parameters and buffers shared, not
copied; the module itself is left as it was): each targeted submodule gets parameters
``lora_A`` (rank, in) and ``lora_B`` (out, rank) and a forward hook that adds
``scale · (x Aᵀ) Bᵀ`` to its output. The hook runs under ``torch.func.functional_call`` (the
torch path) and is captured by ``torch.export`` like any other code of the forward (the
lowered path), so both backends compute the same ops, and forward mode sees the adapters as
ordinary parameters.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from duogard.backend import backend, backend_of
from duogard.nn._lora import LoRA, folded, init_adapters, lora_options, select_targets
from duogard.nn._module import init_rng
from duogard.tree import flatten_dict

__all__ = ["PortLoRA", "adapt", "adapted_copy", "linear_layers"]


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's projections): ``x @ weight + bias``, weight (in, out)."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
    )


def linear_layers(module: nn.Module) -> dict[str, tuple[int, int, bool]]:
    """``{module path: (out, in, transposed)}`` for every ``torch.nn.Linear`` and Hugging Face
    ``Conv1D`` submodule (``transposed``: its weight is (in, out)), in module order.
    """
    out = {}
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            out[name] = (int(sub.out_features), int(sub.in_features), False)
        elif _is_conv1d(sub):
            n_in, n_out = (int(d) for d in sub.weight.shape)
            out[name] = (n_out, n_in, True)
    return out


class _AdapterHook:
    """``output + scale · (x Aᵀ) Bᵀ`` for the submodule's input ``x`` (its first argument)."""

    def __init__(self, scale: float):
        self.scale = float(scale)

    def __call__(self, module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        h = F.linear(x, module.lora_A) * self.scale
        return output + F.linear(h, module.lora_B)


def adapted_copy(module: nn.Module, adapters: dict, scale: float) -> nn.Module:
    """A copy of ``module`` (sharing its parameters and buffers) with LoRA adapters on the
    submodules named in ``adapters`` (``{path: (A, B)}``, NumPy; copied into new parameters).
    """
    shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
    clone = copy.deepcopy(module, memo=shared)
    for name, (a, b) in adapters.items():
        sub = clone.get_submodule(name)
        for attr, value in (("lora_A", a), ("lora_B", b)):
            if hasattr(sub, attr):
                raise ValueError(f"lora: {name!r} ({type(sub).__name__}) has an attribute {attr!r} already")
            tensor = torch.from_numpy(value.copy()).to(device=sub.weight.device)
            sub.register_parameter(attr, nn.Parameter(tensor))
        sub.register_forward_hook(_AdapterHook(scale), with_kwargs=True)
    return clone


@dataclass(frozen=True)
class PortLoRA(LoRA):
    """A ported model's adapters (its ``.lora``): :class:`duogard.nn.LoRA` and, per target, its
    ``(out, in, transposed)`` and the key of its weight in the model's params (the first name of
    a tied one).
    """

    layers: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)

    def draw(self, rng, params: dict, dtype=None) -> dict:
        """The adapters drawn from ``rng`` (flat, :attr:`names`), each in its base weight's dtype
        (or ``dtype``): ``A`` as torch.nn.Linear's weight, ``B`` zeros.
        """
        out = {}
        for t, (n_out, n_in, _) in self.layers.items():
            dt = params[self.weights[t]].dtype if dtype is None else np.dtype(dtype)
            ((a, b),) = init_adapters(rng, {t: (n_out, n_in)}, self.rank, dt).values()
            out[_key(t, "lora_A")], out[_key(t, "lora_B")] = a, b
        return out

    def merge(self, params: dict, adapters: dict, tied: dict) -> dict:
        """``params`` less the adapters (NumPy copies) with ``scale · B A`` folded into each
        target's weight.

        Raises:
            KeyError: ``adapters`` are not these adapters.
            ValueError: a target's weight is tied to another name (the update would change the
                other use too).
        """
        if set(adapters) != set(self.names):
            raise KeyError(
                f"merge: adapters must be the model's params {sorted(self.names)}, got {sorted(adapters)}"
            )
        adapter_names = set(self.names)
        out = {k: np.array(v, copy=True) for k, v in params.items() if k not in adapter_names}
        for t, (_, _, transposed) in self.layers.items():
            key = self.weights[t]
            if key in tied:
                raise ValueError(
                    f"merge: the weight of {t!r} is one tensor with {list(tied[key])} (tied weights): "
                    "folding the adapters into it would change the other uses too; leave it out of "
                    "targets, or untie the module"
                )
            a, b = (_numpy_copy(adapters[_key(t, f"lora_{p}")]) for p in "AB")
            out[key] = folded(out[key], a, b, self.scale, transposed=transposed)
        return out


def _key(path: str, leaf: str) -> str:
    return f"{path}.{leaf}" if path else leaf


def _numpy_copy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return backend("torch").to_numpy(value.detach()).copy()
    if isinstance(value, (np.ndarray, np.generic)):
        return np.array(value, copy=True)
    return np.array(backend_of(value).to_numpy(value), copy=True)


def adapt(base, params, *, rank, alpha, targets) -> tuple[nn.Module, PortLoRA, dict]:
    """What :meth:`TorchModel.with_lora` needs: the adapted copy of ``base.module``, its
    :class:`PortLoRA` and the base weights (``base.params`` updated by ``params``, NumPy).

    Raises:
        ValueError: bad ``rank``, ``alpha`` or ``targets`` (a pattern matching no Linear layer).
        KeyError: ``params`` has keys the base's params do not.
    """
    rank, alpha, patterns = lora_options(rank, alpha, targets)
    name = type(base.module).__name__
    base_params = dict(base.params)
    if params is not None:
        given = flatten_dict(params) if isinstance(params, dict) else None
        unknown = None if given is None else sorted(set(given) - set(base_params))
        if given is None or unknown:
            raise KeyError(
                f"lora: params must be {name}'s params, flat, keyed like model.params (or a part of "
                f"them: trained ones), got " + (type(params).__name__ if given is None else f"keys {unknown}")
            )
        base_params.update({k: _numpy_copy(v) for k, v in given.items()})
    layers = linear_layers(base.module)
    chosen = select_targets(list(layers), patterns, what=name)
    aliases = getattr(base, "_aliases", {})
    spec = PortLoRA(
        chosen, rank, alpha,
        layers={t: layers[t] for t in chosen},
        weights={t: aliases.get(_key(t, "weight"), _key(t, "weight")) for t in chosen},
    )  # fmt: skip
    adapters = spec.draw(init_rng(0), base_params)
    pairs = {t: (adapters[_key(t, "lora_A")], adapters[_key(t, "lora_B")]) for t in chosen}
    return adapted_copy(base.module, pairs, spec.scale), spec, base_params
