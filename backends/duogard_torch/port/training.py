"""Training mode of a ported module on torch tensors: portable dropout masks, batch norm
without in-place updates, and which layers make a module train differently.

Dropout masks are duogard's portable draws, so that a module gives the same training-mode
output on torch and on JAX for the same key: the i-th dropout applied in execution order
(i = 0, 1, 2 ...) keeps an entry where ``be.bernoulli(be.fold_in(key, i), 1 - p, shape)`` is
true and outputs ``where(keep, x / (1 - p), 0)``. On torch tensors :class:`PortableTrainMode`
(a ``TorchFunctionMode``) intercepts ``F.dropout``, attention's dropout and ``bernoulli`` draws
of a float probability (stochastic depth) inside the real module; the lowered graphs count
their random nodes in graph order (the execution order).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from duogard.backend import backend, backend_of

__all__ = ["PortableTrainMode", "batchnorm_state_names", "key_for_backend", "train_mode_layers"]

_DROPOUT_SIG = inspect.signature(F.dropout)
_MHA_SIG = inspect.signature(F.multi_head_attention_forward)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_BATCH_NORM_SIG = inspect.signature(F.batch_norm)


class PortableTrainMode(TorchFunctionMode):
    """Inside a module's forward on torch tensors: dropout from a key, batch norm untouched.

    Args:
        key: a torch backend key, or None to keep torch's own RNG for dropout.
        update_running_stats: let ``F.batch_norm`` update the running statistics it is given
            (in place: pass clones); otherwise training-mode batch norm uses batch statistics
            and updates nothing.
    """

    def __init__(self, key=None, *, update_running_stats: bool = False):
        super().__init__()
        self.key = key
        self.update_running_stats = update_running_stats
        self.count = 0
        self._be = backend("torch")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout and self.key is not None:
            bound = _DROPOUT_SIG.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            if a["training"]:
                return self._dropout(a["input"], float(a["p"]))
        if (
            func in (torch.bernoulli, torch.Tensor.bernoulli, torch.Tensor.bernoulli_)
            and self.key is not None
        ):
            out = self._bernoulli(func, args, kwargs)
            if out is not None:
                return out
        if func is torch.rand and self.key is not None and kwargs.get("generator") is None:
            return self._rand(args, kwargs)
        if func is F.scaled_dot_product_attention and self.key is not None:
            out = self._sdpa(args, kwargs)
            if out is not None:
                return out
        if func is F.multi_head_attention_forward and self.key is not None:
            bound = _MHA_SIG.bind(*args, **kwargs)
            bound.apply_defaults()
            if bound.arguments["training"] and bound.arguments["dropout_p"] > 0:
                return self._attention_module(func, args, kwargs)
        if func is F.batch_norm and not self.update_running_stats:
            bound = _BATCH_NORM_SIG.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            if a["training"] and a["running_mean"] is not None:
                a["running_mean"] = a["running_var"] = None  # batch statistics, no update
                return func(**a)
        return func(*args, **kwargs)

    def _sdpa(self, args, kwargs):
        a = dict(zip(_SDPA_PARAMS, args), **kwargs)
        if a.get("dropout_p", 0.0) > 0:
            return self._attention(**a)
        return None

    def _attention_module(self, func, args, kwargs):
        # F.multi_head_attention_forward is dispatched as a whole (this mode is off inside it):
        # its own dropout and attention calls, module globals, take the portable dropout for
        # the duration of the call
        saved = F.dropout, F.scaled_dot_product_attention

        def dropout(input, p=0.5, training=True, inplace=False):
            return self._dropout(input, float(p)) if training else input

        def attention(*a, **k):
            out = self._sdpa(a, k)
            return saved[1](*a, **k) if out is None else out

        F.dropout, F.scaled_dot_product_attention = dropout, attention
        try:
            return func(*args, **kwargs)
        finally:
            F.dropout, F.scaled_dot_product_attention = saved

    def _attention(
        self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
    ):
        # the math form of scaled_dot_product_attention, with the portable dropout where the
        # lowering (duogard_torch.port.aten.attention) has its dropout (on the weights)
        n_q, n_k = query.shape[-2], key.shape[-2]
        if enable_gqa:
            key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
            value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
        root = (1.0 / float(query.shape[-1]) ** 0.5 if scale is None else scale) ** 0.5
        scores = (query * root) @ (key * root).transpose(-2, -1)
        if is_causal:
            causal = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        weights = torch.softmax(scores, dim=-1)
        if is_causal or attn_mask is not None:  # a row with every key masked: 0, not NaN
            weights = torch.where((scores != float("-inf")).any(-1, keepdim=True), weights, 0.0)
        return self._dropout(weights, float(dropout_p)) @ value

    def _bernoulli(self, func, args, kwargs):
        # x.bernoulli_(p), torch.bernoulli(x, p): a draw of probability p (a float) in x's shape,
        # the next index (the lowering's aten.bernoulli.p); torch.bernoulli(probs) and
        # x.bernoulli_(probs): one probability per entry, uniform(key) < probs in the
        # probabilities' dtype (the lowering's rand < p, and aten.bernoulli.Tensor)
        default = 0.5 if func is torch.Tensor.bernoulli_ else None  # else x holds the probabilities
        x, p = args[0], (args[1] if len(args) > 1 else kwargs.get("p", default))
        if p is None:
            p = x
        if isinstance(p, torch.Tensor):
            probs = p.detach().broadcast_to(x.shape)
        elif isinstance(p, (int, float)) and not isinstance(p, bool):
            probs = None
        else:
            return None
        index = self.count
        self.count += 1
        be = self._be
        key = be.fold_in(self.key, index)
        if probs is None:
            keep = be.bernoulli(key, float(p), tuple(x.shape), device=x.device)
        else:
            keep = be.uniform(key, tuple(x.shape), dtype=probs.dtype, device=x.device) < probs
        keep = keep.to(x.dtype)
        return x.copy_(keep) if func is torch.Tensor.bernoulli_ else keep

    def _rand(self, args, kwargs):
        # torch.rand(*size, dtype=...): the next index's uniform numbers (the lowering's aten.rand)
        size = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
        dtype = kwargs.get("dtype") or torch.get_default_dtype()
        index = self.count
        self.count += 1
        be = self._be
        return be.uniform(
            be.fold_in(self.key, index), tuple(int(s) for s in size), dtype=dtype, device=kwargs.get("device")
        )

    def _dropout(self, x, p):
        if p == 0.0:  # torch.export drops these: they take no index
            return x
        index = self.count
        self.count += 1
        if p >= 1.0:
            return torch.zeros_like(x)
        be = self._be
        keep = be.bernoulli(be.fold_in(self.key, index), 1.0 - p, tuple(x.shape), device=x.device)
        return torch.where(keep, x / (1.0 - p), torch.zeros_like(x))


def key_for_backend(be, key):
    """``key`` as a key of backend ``be`` (the same words), or None."""
    if key is None or be.is_array(key):
        return key
    return be.key_from_data(backend_of(key).key_data(key))


#: stochastic depth's modules, by class name (torchvision's ``p``, timm's ``drop_prob``): they
#: draw with ``bernoulli_`` in training
_DROP_PATHS = ("StochasticDepth", "DropPath")


def train_mode_layers(module: nn.Module) -> list[str]:
    """The submodules that compute differently in training: dropout with p > 0, batch norm,
    attention with dropout > 0, stochastic depth (torchvision's ``StochasticDepth``, timm's
    ``DropPath``) with p > 0 (paths, ``"<root>"`` for the module itself).
    """
    found = []
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            found.append(name or "<root>")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            found.append(name or "<root>")
        elif isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            found.append(name or "<root>")
        elif type(m).__name__ in _DROP_PATHS and (getattr(m, "p", None) or getattr(m, "drop_prob", None)):
            found.append(name or "<root>")
    return found


def batchnorm_state_names(module: nn.Module) -> list[str]:
    """The state_dict names of the batch norm buffers a training step updates."""
    names = []
    for path, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            prefix = f"{path}." if path else ""
            for buf in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(m, buf, None) is not None:
                    names.append(prefix + buf)
    return names
