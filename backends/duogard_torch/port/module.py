"""A ``torch.nn.Module`` as a duogard model, and back.

:func:`from_torch` wraps a module as a :class:`TorchModel` (a :class:`duogard.nn.Module`):
its parameters and buffers become a flat dict of NumPy arrays keyed exactly like the module's
``state_dict``, and ``model.apply(params, x)`` runs the module functionally:

- torch tensors: ``torch.func.functional_call`` on the module itself (the reference);
- any other backend (JAX): the forward captured once with ``torch.fx`` and lowered onto
  duogard's backend ops (:mod:`.lower`), differentiable and jittable there.

:func:`to_torch` loads trained params (of any backend, or NumPy) back into the module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.func

from duogard.backend import backend, backend_of
from duogard.nn import Module
from duogard.tree import flatten_dict

from .lower import UnsupportedTorchOpsError, lower_module

__all__ = ["TorchModel", "UnsupportedTorchOpsError", "from_torch", "to_torch"]


def _flat_params(params, where: str) -> dict:
    if not isinstance(params, dict):
        raise TypeError(
            f"{where}: params must be a dict keyed like the module's state_dict, got {type(params).__name__}"
        )
    # nested dicts (e.g. {"fc0": {"weight": ...}}) are accepted and flattened to "fc0.weight"
    return flatten_dict(params) if any(isinstance(v, dict) for v in params.values()) else dict(params)


def _torch_seed(key) -> int:
    words = [int(w) for w in np.asarray(backend_of(key).key_data(key)).reshape(-1)]
    seed = 0
    for w in words:
        seed = (seed * 0x100000001B3 + w) & 0x7FFFFFFFFFFFFFFF
    return seed


def _bn_with_running_stats(module) -> list[str]:
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


class TorchModel(Module):
    """A ``torch.nn.Module`` as a duogard model (made by :func:`from_torch`).

    Attributes:
        module: the wrapped torch module (never modified by :meth:`apply`).
        params: the module's parameters AND buffers at wrapping time, a flat dict of NumPy
            arrays keyed exactly like ``module.state_dict()``. NumPy, so that every backend
            starts from identical numbers.
        trainable_names: names of the parameters with ``requires_grad`` (what an estimator
            should differentiate); everything else (buffers, frozen parameters) is state.

    ``apply(params, x, *, key=None, train=False)``:
        ``params`` may hold every state_dict entry, or only the trainable ones (see
        :meth:`trainable`): missing state entries are taken from :attr:`params`. Buffers are
        always passed explicitly, never mutated in place. ``train`` selects the module's
        train/eval behaviour (dropout, batch norm) for this call only. BatchNorm with running
        statistics cannot run with ``train=True`` (it would update its buffers in place): a
        clear error says so; eval mode is fine.

        - torch tensor ``x``: ``torch.func.functional_call(module, params, (x,))``; with
          ``train=True`` and a ``key``, torch's RNG is seeded from the key inside
          ``torch.random.fork_rng`` (dropout masks are then deterministic); without a key
          torch's global RNG is used, as in PyTorch.
        - any other array (JAX, or NumPy on a non-torch default backend): the lowered fx
          graph (:meth:`lower`); dropout with ``train=True`` needs ``key``. The masks
          differ from torch's (different generators).
    """

    def __init__(self, module, example_input=None):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"from_torch: module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        state = module.state_dict(keep_vars=True)
        self.params = {k: v.detach().cpu().numpy().copy() for k, v in state.items()}
        self.trainable_names = tuple(k for k, p in module.named_parameters() if p.requires_grad)
        self._batchnorms = _bn_with_running_stats(module)
        self._lowered: dict[bool, Any] = {}
        if example_input is not None:
            x = _as_torch(example_input, "from_torch: example_input")
            try:
                self.apply(self.params, x)
            except Exception as exc:
                raise ValueError(
                    f"from_torch: {type(module).__name__} fails on example_input of shape "
                    f"{tuple(x.shape)}: {type(exc).__name__}: {exc}"
                ) from exc

    # ------------------------------------------------------------------ duogard Module protocol
    def init(self, seed=None, example_input=None, *, dtype=None) -> dict:
        """The module's own weights and buffers (copies, NumPy), keyed like its ``state_dict``.

        ``seed`` is ignored: the weights are those the torch module already holds (it was
        initialised by torch). ``dtype`` (optional) casts the floating-point entries.
        """
        out = {k: v.copy() for k, v in self.params.items()}
        if dtype is not None:
            dt = np.dtype(dtype if isinstance(dtype, str) else getattr(dtype, "name", dtype))
            out = {k: v.astype(dt) if np.issubdtype(v.dtype, np.floating) else v for k, v in out.items()}
        return out

    def init_params(self, rng, input_shape, dtype):
        # nested in a duogard Sequential: the torch weights, and the output shape from torch
        with torch.no_grad():
            x = torch.zeros(tuple(input_shape), dtype=torch.float32)
            out = self._torch_apply(self.params, x, key=None, train=False)
        return self.init(), tuple(out.shape)

    def forward(self, be, params, x, *, key=None, train=False):
        return self.apply(params, x, key=key, train=train)

    def apply(self, params, x, *, key=None, train: bool = False):
        """Run the module on ``x`` with ``params`` (see the class docstring)."""
        if not isinstance(x, torch.Tensor):
            be = backend_of(x)
            if not be.is_array(x):  # NumPy or a list: an array of the selected backend
                x = be.asarray(np.asarray(x))
        if isinstance(x, torch.Tensor):
            return self._torch_apply(params, x, key=key, train=train)
        return self.lowered_apply(params, x, key=key, train=train)

    # ------------------------------------------------------------------ params
    def trainable(self, params: dict | None = None) -> dict:
        """The trainable entries of ``params`` (default: :attr:`params`): what to optimise."""
        params = self.params if params is None else _flat_params(params, "TorchModel.trainable")
        return {k: params[k] for k in self.trainable_names}

    def _full_params(self, params, be, where: str, device=None) -> dict:
        params = _flat_params(params, where)
        unknown = sorted(set(params) - set(self.params))
        missing = sorted(k for k in self.trainable_names if k not in params)
        if unknown or missing:
            raise KeyError(
                f"{where}: params do not match {type(self.module).__name__}'s state_dict: "
                + (f"unknown keys {unknown}" if unknown else "")
                + ("; " if unknown and missing else "")
                + (f"missing trainable keys {missing}" if missing else "")
            )
        full = {}
        for k, v in self.params.items():
            value = params.get(k, v)
            full[k] = value if be.is_array(value) else be.asarray(_maybe_numpy(value), device=device)
        return full

    # ------------------------------------------------------------------ torch path
    def _torch_apply(self, params, x, *, key, train):
        be = backend("torch")
        if train and self._batchnorms:
            raise ValueError(
                f"from_torch model: BatchNorm layers {self._batchnorms} cannot run with train=True: "
                "they would update their running statistics in place. Use train=False (eval-mode "
                "batch norm), or build them with track_running_stats=False"
            )
        full = self._full_params(params, be, "TorchModel.apply", device=x.device)
        was_training = self.module.training
        self.module.train(bool(train))
        try:
            if train and key is not None:
                with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                    torch.manual_seed(_torch_seed(key))
                    return torch.func.functional_call(self.module, full, (x,))
            return torch.func.functional_call(self.module, full, (x,))
        finally:
            self.module.train(was_training)

    # ------------------------------------------------------------------ lowered path
    def lower(self, *, train: bool = False):
        """The module's forward traced with torch.fx and lowered onto duogard's backend ops.

        Args:
            train: lower the training-mode forward (dropout active) or the eval-mode one.

        Returns:
            The :class:`~duogard_torch.port.lower.LoweredGraph` (cached per mode).

        Raises:
            UnsupportedTorchOpsError: lists every op it cannot lower, with node names and
                module paths.
        """
        train = bool(train)
        if train not in self._lowered:
            self._lowered[train] = lower_module(self.module, train=train)
        return self._lowered[train]

    def lowered_apply(self, params, x, *, key=None, train: bool = False):
        """Run the lowered graph on ``x``'s backend (any backend, torch included)."""
        be = backend_of(x)
        graph = self.lower(train=train)
        # torch: put NumPy params on x's device (jax places them on its default device)
        device = be.device_of(x) if isinstance(x, torch.Tensor) else None
        full = self._full_params(params, be, "TorchModel.apply", device=device)
        return graph.run(be, full, x, key=key)

    def output_shape(self, input_shape: tuple) -> tuple:
        return self.init_params(None, input_shape, None)[1]

    def __repr__(self) -> str:
        n = sum(int(np.prod(self.params[k].shape)) for k in self.trainable_names)
        return f"from_torch({type(self.module).__name__}, {n} trainable parameters)"


def _maybe_numpy(value):
    # another framework's array goes through the target backend's asarray (DLPack there)
    if isinstance(value, (np.ndarray, torch.Tensor)) or backend_of(value).is_array(value):
        return value
    return np.asarray(value)


def _as_torch(x, where: str):
    if isinstance(x, torch.Tensor):
        return x
    try:
        return backend("torch").asarray(x if not isinstance(x, (list, tuple)) else np.asarray(x))
    except Exception as exc:
        raise TypeError(f"{where}: expected an array (torch, NumPy or JAX), got {type(x).__name__}") from exc


def from_torch(module, example_input=None, *, lower: bool = False) -> TorchModel:
    """Wrap a ``torch.nn.Module`` as a duogard model.

    Args:
        module: the torch module (its weights are used as they are; it is not modified).
        example_input: an input to check the module with (run once, functionally, in eval
            mode); optional.
        lower: trace and lower the forward for non-torch backends now (raising the error that
            lists every unsupported op at once), instead of at the first JAX call.

    Returns:
        A :class:`TorchModel`: ``model.params`` (NumPy, keyed like ``module.state_dict()``,
        parameters and buffers), ``model.init(seed, x)`` (those params; the seed is ignored),
        ``model.apply(params, x, *, key=None, train=False)`` on torch tensors or JAX arrays.
        Train it with any duogard estimator on ``model.trainable(params)`` (for a module
        without buffers or frozen parameters, that is all of ``params``).

    Raises:
        TypeError: ``module`` is not a ``torch.nn.Module``.
        ValueError: the module fails on ``example_input``.
        UnsupportedTorchOpsError: with ``lower=True``, the ops that cannot be lowered.
    """
    model = TorchModel(module, example_input)
    if lower:
        model.lower(train=False)
    return model


def to_torch(params, module, *, strict: bool = True):
    """Load ``params`` into ``module`` in place, with ``load_state_dict``.

    Values are copied into the module's tensors (their dtype and device are kept).

    Args:
        params: a dict keyed like ``module.state_dict()`` (flat, or nested by module path) of
            NumPy, torch or JAX arrays.
        module: the ``torch.nn.Module`` to load them into.
        strict: the keys must match the state_dict exactly (default); with False, missing
            keys keep the module's values.

    Returns:
        The module.

    Raises:
        TypeError: ``module`` is not a ``torch.nn.Module``.
        KeyError: the keys do not match (it lists the missing and unexpected ones).
        ValueError: a shape does not match the module's.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"to_torch: module must be a torch.nn.Module, got {type(module).__name__}")
    flat = _flat_params(params, "to_torch")
    current = module.state_dict()
    missing = sorted(set(current) - set(flat))
    unexpected = sorted(set(flat) - set(current))
    if unexpected or (strict and missing):
        raise KeyError(
            f"to_torch: params do not match {type(module).__name__}'s state_dict"
            + (f"; missing keys {missing}" if missing and strict else "")
            + (f"; unexpected keys {unexpected}" if unexpected else "")
        )
    tbe = backend("torch")
    state = {}
    for k, v in flat.items():
        t = v if isinstance(v, torch.Tensor) else tbe.asarray(_maybe_numpy(v))
        if tuple(t.shape) != tuple(current[k].shape):
            raise ValueError(
                f"to_torch: params[{k!r}] has shape {tuple(t.shape)}, the module expects "
                f"{tuple(current[k].shape)}"
            )
        state[k] = t.detach()
    module.load_state_dict(state, strict=strict)
    return module
