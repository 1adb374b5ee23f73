"""A ``torch.nn.Module`` as a duogard model, and back.

:func:`from_torch` wraps a module as a :class:`TorchModel` (a :class:`duogard.nn.Module`):
its parameters and buffers become a flat dict of NumPy arrays keyed exactly like the module's
``state_dict``, and ``model.apply(params, x)`` runs the module functionally:

- torch tensors: ``torch.func.functional_call`` on the module itself (the reference);
- any other backend (JAX): the forward captured with ``torch.export`` (decomposed to the core
  ATen operators, one graph per train/eval mode and input shape and dtype) and lowered onto
  duogard's backend ops (:mod:`.export`, :mod:`.aten`), differentiable and jittable there. Where
  export cannot capture the forward, the ``torch.fx`` lowering (:mod:`.lower`) is used instead;
  :attr:`TorchModel.lowered_path` says which.

:func:`to_torch` loads trained params (of any backend, or NumPy) back into the module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.func

from duogard.backend import backend, backend_of
from duogard.nn import Module
from duogard.nn._module import init_rng
from duogard.tree import flatten_dict

from .export import ExportCaptureError, capture, lower_exported
from .helpers import UnsupportedTorchOpsError, in_mode, real_cause
from .lora import adapt
from .lower import lower_module
from .tied import aliases_of, resolve, tie_groups, with_aliases
from .training import PortableTrainMode, batchnorm_state_names, key_for_backend, train_mode_layers

__all__ = ["TorchModel", "UnsupportedTorchOpsError", "from_torch", "to_torch"]


def _flat_params(params, where: str) -> dict:
    if not isinstance(params, dict):
        raise TypeError(
            f"{where}: params must be a dict keyed like the module's state_dict, got {type(params).__name__}"
        )
    # nested dicts (e.g. {"fc0": {"weight": ...}}) are accepted and flattened to "fc0.weight"
    return flatten_dict(params) if any(isinstance(v, dict) for v in params.values()) else dict(params)


class TorchModel(Module):
    """A ``torch.nn.Module`` as a duogard model (made by :func:`from_torch`).

    Attributes:
        module: the wrapped torch module (never modified by :meth:`apply`).
        params: the module's parameters AND buffers at wrapping time, a flat dict of NumPy
            arrays keyed exactly like ``module.state_dict()``. NumPy, so that every backend
            starts from identical numbers. A tensor the module holds under several names (tied
            weights: an LM head sharing the embedding) is ONE entry, under its first name.
        tied: ``{first name: (first name, other names ...)}`` for every tied tensor (empty
            without tied weights): the lowered graphs read the first name's entry for every
            name of its group, and :func:`to_torch` writes it to all of them;
            :meth:`state_dict` gives params under every name.
        trainable_names: names of the parameters with ``requires_grad`` (what an estimator
            should differentiate); everything else (buffers, frozen parameters) is state.
        lora: None, or for a model made by :func:`duogard.lora` (:meth:`with_lora`) what it
            adapts (targets, rank, alpha, scale): then :attr:`module` is a copy of the base
            module with the adapters, :attr:`trainable_names` are the adapters only, ``init``
            draws them and :meth:`merge` folds them into the base weights.

        lowered_path: ``"export"`` or ``"fx"``: how the last lowered graph was captured (None
            before any lowering); ``lowered_fallback_reason`` says why export was not used.

    ``apply(params, x, *, key=None, train=False)``:
        ``params`` may hold every state_dict entry, or only the trainable ones (see
        :meth:`trainable`): missing state entries are taken from :attr:`params`. Buffers are
        always passed explicitly, never mutated in place. ``train`` selects the module's
        train/eval behaviour (dropout, batch norm) for this call only: batch norm in training
        mode normalises with batch statistics and updates nothing (:meth:`update_state` gives
        the new running statistics).

        - torch tensor ``x``: ``torch.func.functional_call(module, params, (x,))`` (buffers
          cloned in training mode).
        - any other array (JAX, or NumPy on a non-torch default backend): the lowered graph
          (:meth:`lower`).

        With ``train=True`` and a ``key``, dropout masks are duogard's portable draws, identical
        on both backends: the i-th dropout in execution order keeps
        ``be.bernoulli(be.fold_in(key, i), 1 - p, shape)``. Without a key, torch tensors use
        torch's global RNG (as in PyTorch) and the lowered graph refuses to run dropout.

    Training hooks (:class:`duogard.nn.Module`): :attr:`has_train_mode`, :attr:`has_state`,
    :meth:`initial_state`, :meth:`update_state`.
    """

    def __init__(self, module, example_input=None):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"from_torch: module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        state = module.state_dict(keep_vars=True)
        # NumPy has no bfloat16: the torch backend's to_numpy gives ml_dtypes' (JAX's own)
        to_numpy = backend("torch").to_numpy
        self.tied = tie_groups(module)
        self._aliases = aliases_of(self.tied)
        self.params = {k: to_numpy(v).copy() for k, v in state.items() if k not in self._aliases}
        self.trainable_names = tuple(k for k, p in module.named_parameters() if p.requires_grad)
        self._buffer_names = frozenset(self.params) - {k for k, _ in module.named_parameters()}
        self._placed: dict = {}  # the entries taken from self.params, per backend and device
        self._state_names = batchnorm_state_names(module)
        self.lora = None
        self._lowered: dict[tuple, Any] = {}
        self._example_spec = None
        self.lowered_path = None
        self.lowered_fallback_reason = None
        if example_input is not None:
            x = _as_torch(example_input, "from_torch: example_input")
            self._example_spec = (tuple(x.shape), str(x.dtype).removeprefix("torch."))
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
        initialised by torch). ``dtype`` (optional) casts the floating-point entries. A LoRA
        model's params are its adapters, drawn from ``seed`` (``A`` as torch.nn.Linear's weight,
        ``B`` zeros): see :func:`duogard.lora`.
        """
        if self.lora is not None:
            return self.lora.draw(init_rng(0 if seed is None else seed), self.params, dtype)
        out = {k: v.copy() for k, v in self.params.items()}
        if dtype is not None:
            dt = np.dtype(dtype if isinstance(dtype, str) else getattr(dtype, "name", dtype))
            out = {k: v.astype(dt) if _is_floating(v.dtype) else v for k, v in out.items()}
        return out

    def init_params(self, rng, input_shape, dtype):
        # nested in a duogard Sequential: the torch weights, and the output shape from torch
        with torch.no_grad():
            x = torch.zeros(tuple(input_shape), dtype=torch.float32)
            out = self._torch_apply(self.params, x, key=None, train=False)
        if self.lora is None:
            return self.init(), tuple(out.shape)
        return self.lora.draw(init_rng(0) if rng is None else rng, self.params), tuple(out.shape)

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

    def state_dict(self, params: dict | None = None) -> dict:
        """``params`` (default: :attr:`params`) under every ``state_dict`` name of the module: each
        tied tensor's value under all the names that share it (for a checkpoint, or a copy of
        the module whose weights are not tied). The arrays are not copied.
        """
        params = self.params if params is None else _flat_params(params, "TorchModel.state_dict")
        return with_aliases(dict(params), self._aliases)

    # ------------------------------------------------------------------ LoRA
    def with_lora(self, params=None, *, rank: int, alpha: float | None = None, targets="*") -> TorchModel:
        """This module with LoRA adapters on its ``torch.nn.Linear`` and Hugging Face ``Conv1D``
        submodules (named by module path), every base weight frozen (``params``, default
        :attr:`params`): a model whose params are the adapters (:mod:`.lora` says how; the
        arguments are :func:`duogard.lora`'s, which calls it).
        """
        if self.lora is not None:
            raise TypeError(
                "lora: model is adapted already; merge its adapters first (model.merge(adapters))"
            )
        module, spec, base_params = adapt(self, params, rank=rank, alpha=alpha, targets=targets)
        spec_in = self._example_spec
        example = None if spec_in is None else torch.zeros(spec_in[0], dtype=getattr(torch, spec_in[1]))
        model = TorchModel(module, example)
        model.params.update(base_params)  # the base weights (those given), frozen
        model.lora, model.trainable_names = spec, spec.names
        return model

    def merge(self, adapters) -> dict:
        """A LoRA model's base params (NumPy, keyed like the base model's) with the adapters
        folded into the targeted weights, ``W + scale · B A``: ``dg.to_torch(model.merge(a),
        base_module)`` loads them into the original module.
        """
        if self.lora is None:
            raise TypeError("TorchModel.merge: this model has no LoRA adapters (see duogard.lora)")
        return self.lora.merge(self.params, _flat_params(adapters, "TorchModel.merge"), self.tied)

    def _full_params(self, params, be, where: str, device=None) -> dict:
        params = _flat_params(params, where)
        tied = sorted(k for k in params if k in self._aliases)
        if tied:
            raise KeyError(
                f"{where}: {', '.join(repr(k) for k in tied)} "
                f"{'is' if len(tied) == 1 else 'are'} tied to "
                f"{', '.join(repr(self._aliases[k]) for k in tied)} (one tensor in "
                f"{type(self.module).__name__}): pass each tied tensor once, under the name "
                "model.params holds it"
            )
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
        placed = self._placed.setdefault((be.name, repr(device)), {})
        for k, v in self.params.items():
            if k in params:
                value = params[k]
                full[k] = value if be.is_array(value) else be.asarray(_maybe_numpy(value), device=device)
                continue
            # an entry not given (a buffer, a frozen weight) is placed once per backend and device,
            # not at every call (on CUDA that would copy every frozen weight to the GPU each step);
            # inside a trace it is a constant of the program, made anew
            cached = placed.get(k)
            if cached is not None and cached[0] is v:
                full[k] = cached[1]
                continue
            full[k] = be.asarray(v, device=device)
            if not be.is_tracing(full[k]):
                placed[k] = (v, full[k])
        return full

    # ------------------------------------------------------------------ torch path
    def _torch_apply(self, params, x, *, key, train, update_state=False):
        be = backend("torch")
        full = self._full_params(params, be, "TorchModel.apply", device=x.device)
        if train:
            # buffers are updated in place by torch's layers (num_batches_tracked.add_, or
            # running statistics): they run on clones, never on the caller's arrays (NumPy
            # params share memory with torch.from_numpy); parameters, frozen ones included, are
            # only read
            full = {k: v.clone() if k in self._buffer_names else v for k, v in full.items()}
        with in_mode(self.module, bool(train)):
            if not train:
                return torch.func.functional_call(self.module, full, (x,))
            mode = PortableTrainMode(key_for_backend(be, key), update_running_stats=update_state)
            if update_state:
                with torch.no_grad(), mode:
                    torch.func.functional_call(self.module, full, (x,))
                return {k: full[k] for k in self._state_names}
            with mode:
                return torch.func.functional_call(self.module, full, (x,))

    # ------------------------------------------------------------------ training hooks
    @property
    def has_train_mode(self) -> bool:  # type: ignore[override]
        """Whether a submodule computes differently in training (dropout with p > 0, batch norm,
        attention dropout): training steps then run ``apply(..., train=True, key=...)``.

        Judged from the submodules: a bare ``F.dropout(x, p, self.training)`` in a forward is
        not seen (use ``nn.Dropout``).
        """
        return bool(train_mode_layers(self.module))

    @property
    def has_state(self) -> bool:  # type: ignore[override]
        """Whether the module has batch norm running statistics (state that training updates)."""
        return bool(self._state_names)

    def initial_state(self) -> dict:
        """The batch norm buffers before training: NumPy copies keyed like the state_dict."""
        return {k: self.params[k].copy() for k in self._state_names}

    def update_state(self, params, x, *, key=None) -> dict:
        """The batch norm buffers after one training-mode forward pass over ``x``.

        Args:
            params: the params merged with the current state (``{**params, **state}``).
            x: the batch's inputs (torch tensor, JAX array ...).
            key: the step's key (the one its training forward used: the dropout masks before a
                batch norm change its statistics).

        Returns:
            New arrays of ``x``'s backend for every state entry (:meth:`initial_state`'s keys);
            nothing is mutated. torch: the module itself under ``no_grad``, on clones; other
            backends: the lowered training graph's buffer outputs.
        """
        if not self._state_names:
            return {}
        if not isinstance(x, torch.Tensor):
            be = backend_of(x)
            if not be.is_array(x):
                x = be.asarray(np.asarray(x))
        if isinstance(x, torch.Tensor):
            return self._torch_apply(params, x, key=key, train=True, update_state=True)
        be = backend_of(x)
        graph = self.lower(train=True, example_input=x)
        full = with_aliases(self._full_params(params, be, "TorchModel.update_state"), self._aliases)
        _, new = graph.run_with_state(be, full, x, key=key_for_backend(be, key))
        return {k: new.get(k, full[k]) for k in self._state_names}

    # ------------------------------------------------------------------ lowered path
    def lower(self, *, train: bool = False, example_input=None):
        """The module's forward lowered onto duogard's backend ops.

        With an example input (``example_input``, else the one given to :func:`from_torch`)
        the forward is captured with ``torch.export`` for that input's shape and dtype and
        decomposed to core ATen (:mod:`.export`); where export cannot capture it (or without
        any example input), with ``torch.fx`` (:mod:`.lower`). :attr:`lowered_path` records
        which (``"export"`` or ``"fx"``) and :attr:`lowered_fallback_reason` why export was
        not used. Graphs are cached per mode, shape and dtype.

        Args:
            train: lower the training-mode forward (dropout active, batch statistics) or the
                eval-mode one.
            example_input: an input (any backend, traced values included: only its shape and
                dtype are used).

        Returns:
            An :class:`~duogard_torch.port.export.ExportedGraph` or a
            :class:`~duogard_torch.port.lower.LoweredGraph`: ``run(be, params, x, *, key=None)``
            and ``run_with_state(...)``; ``graph.path`` is ``"export"`` or ``"fx"``.

        Raises:
            UnsupportedTorchOpsError: lists every op it cannot lower, with node names and
                module paths.
            NotImplementedError: neither export nor fx can capture the forward (both causes
                are given).
        """
        train = bool(train)
        spec = self._example_spec
        if example_input is not None:
            spec = (
                tuple(int(s) for s in example_input.shape),
                str(example_input.dtype).removeprefix("torch."),
            )
        cache_key = (train, spec)
        if cache_key not in self._lowered:
            self._lowered[cache_key] = self._lower(train, spec)
        graph = self._lowered[cache_key]
        self.lowered_path = graph.path
        self.lowered_fallback_reason = getattr(graph, "fallback_reason", None)
        return graph

    def _lower(self, train: bool, spec):
        if spec is None:
            graph = lower_module(self.module, train=train)
            graph.fallback_reason = "no example input to export with (from_torch(module, example_input))"
            return graph
        shape, dtype = spec
        example = torch.zeros(shape, dtype=getattr(torch, dtype))
        try:
            ep, functions = capture(self.module, example, train=train)
        except ExportCaptureError as exc:
            self._check_runs_on(example, train, exc)
            try:
                graph = lower_module(self.module, train=train)
            except NotImplementedError as fx_exc:
                if isinstance(fx_exc, UnsupportedTorchOpsError):
                    note = f"These are torch.fx's spellings: the fallback, because {exc}"
                    raise UnsupportedTorchOpsError(type(self.module).__name__, fx_exc.ops, note) from exc
                raise NotImplementedError(
                    f"from_torch: cannot capture {type(self.module).__name__}.forward to run it on a "
                    f"non-torch backend. {exc} And torch.fx: {fx_exc}"
                ) from exc
            graph.fallback_reason = str(exc)
            return graph
        return lower_exported(self.module, ep, functions)

    def _check_runs_on(self, example, train: bool, export_error) -> None:
        """After an export failure: the module itself fails on such an input (a wrong shape or
        dtype), say so instead of falling back to fx.
        """
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                self._torch_apply(self.params, example, key=None, train=train)
        except Exception as exc:
            raise ValueError(
                f"from_torch: {type(self.module).__name__} fails on an input of shape "
                f"{tuple(example.shape)} and dtype {str(example.dtype).removeprefix('torch.')} "
                f"(in {'training' if train else 'eval'} mode): {real_cause(exc)}"
            ) from export_error.cause

    def lowered_apply(self, params, x, *, key=None, train: bool = False):
        """Run the lowered graph on ``x``'s backend (any backend, torch included)."""
        be = backend_of(x)
        graph = self.lower(train=train, example_input=x)
        # torch: put NumPy params on x's device (jax places them on its default device)
        device = be.device_of(x) if isinstance(x, torch.Tensor) else None
        full = self._full_params(params, be, "TorchModel.apply", device=device)
        # every name of a tied tensor reads the one entry (the gradient of all its uses)
        return graph.run(be, with_aliases(full, self._aliases), x, key=key_for_backend(be, key))

    def output_shape(self, input_shape: tuple) -> tuple:
        return self.init_params(None, input_shape, None)[1]

    def __repr__(self) -> str:
        n = sum(int(np.prod(self.params[k].shape)) for k in self.trainable_names)
        if self.lora is not None:
            lora = self.lora
            return (
                f"lora(from_torch({type(self.module).__name__}), rank={lora.rank}, alpha={lora.alpha:g}, "
                f"{len(lora.targets)} Linear layers, {n} trainable parameters)"
            )
        return f"from_torch({type(self.module).__name__}, {n} trainable parameters)"


def _is_floating(dtype) -> bool:
    # ml_dtypes' bfloat16 is not a NumPy floating subtype
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


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
            mode); optional. Its shape and dtype are also those ``lower=True`` exports with.
        lower: capture and lower the eval-mode forward for non-torch backends now (raising the
            error that lists every unsupported op at once), instead of at the first JAX call:
            with ``torch.export`` given ``example_input``, else with ``torch.fx``.

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

    Values are copied into the module's tensors (their dtype and device are kept). A tensor
    the module holds under several names (tied weights) takes the value given under any one
    of them, and stays one tensor (``lm_head.weight is transformer.wte.weight`` still holds):
    a ported model's params, which hold it once (:attr:`TorchModel.tied`), load as they are.
    Into a module whose weights are NOT tied (a copy that was untied, or built with
    ``tie_word_embeddings=False``), load ``model.state_dict(params)``, which gives the value
    under every name.

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
        ValueError: a shape does not match the module's, or a tied tensor is given two
            different values.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"to_torch: module must be a torch.nn.Module, got {type(module).__name__}")
    tbe = backend("torch")
    flat = _flat_params(params, "to_torch")
    flat = resolve(
        flat, tie_groups(module), lambda v: tbe.to_numpy(v) if isinstance(v, torch.Tensor) else v, "to_torch"
    )
    current = module.state_dict()
    missing = sorted(set(current) - set(flat))
    unexpected = sorted(set(flat) - set(current))
    if unexpected or (strict and missing):
        raise KeyError(
            f"to_torch: params do not match {type(module).__name__}'s state_dict"
            + (f"; missing keys {missing}" if missing and strict else "")
            + (f"; unexpected keys {unexpected}" if unexpected else "")
        )
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
