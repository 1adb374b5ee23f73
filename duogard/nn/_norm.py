"""Normalisation and dropout layers."""

from __future__ import annotations

import numpy as np

from duogard.nn._module import Module

__all__ = ["LayerNorm", "Dropout"]


class LayerNorm(Module):
    """Layer normalisation over the last ``normalized_ndim`` axes, like ``torch.nn.LayerNorm``.

    The normalised shape is inferred from the example input (torch's ``normalized_shape``).
    ``groups=G`` (with ``normalized_ndim=1``) normalises each of G consecutive groups of the
    last axis on its own (the affine parameters still span the whole axis).
    """

    def __init__(
        self,
        normalized_ndim: int = 1,
        *,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        groups: int = 1,
    ):
        if int(normalized_ndim) < 1:
            raise ValueError(f"LayerNorm: normalized_ndim must be >= 1, got {normalized_ndim!r}")
        if not eps > 0:
            raise ValueError(f"LayerNorm: eps must be > 0, got {eps!r}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"LayerNorm: groups must be a positive int, got {groups!r}")
        if groups > 1 and int(normalized_ndim) != 1:
            raise ValueError(f"LayerNorm: groups={groups} needs normalized_ndim=1, got {normalized_ndim!r}")
        self.normalized_ndim = int(normalized_ndim)
        self.eps = float(eps)
        self.elementwise_affine = bool(elementwise_affine)
        self.groups = groups

    def init_params(self, rng, input_shape, dtype):
        if len(input_shape) < self.normalized_ndim:
            raise ValueError(
                f"LayerNorm: expected an input of rank >= {self.normalized_ndim}, "
                f"got shape {tuple(input_shape)}"
            )
        shape = tuple(input_shape[len(input_shape) - self.normalized_ndim :])
        if shape[-1] % self.groups:
            raise ValueError(
                f"LayerNorm(groups={self.groups}): the last axis must be divisible by the groups, "
                f"got shape {tuple(input_shape)}"
            )
        params = {}
        if self.elementwise_affine:
            params = {"weight": np.ones(shape, dtype), "bias": np.zeros(shape, dtype)}
        return params, tuple(input_shape)

    def forward(self, be, params, x, *, key=None, train=False):
        if self.elementwise_affine:
            want = tuple(params["weight"].shape)
            got = tuple(x.shape[x.ndim - self.normalized_ndim :]) if x.ndim >= self.normalized_ndim else ()
            if got != want:
                raise ValueError(
                    f"LayerNorm: expected input shape (..., {', '.join(map(str, want))}), "
                    f"got {tuple(x.shape)}"
                )
        if self.groups == 1:
            return be.layer_norm(
                x,
                params.get("weight"),
                params.get("bias"),
                normalized_ndim=self.normalized_ndim,
                eps=self.eps,
            )
        xp, shape = be.xp, tuple(x.shape)
        if not shape or shape[-1] % self.groups:
            raise ValueError(
                f"LayerNorm(groups={self.groups}): expected a last axis divisible by the groups, got {shape}"
            )
        xg = xp.reshape(x, (*shape[:-1], self.groups, shape[-1] // self.groups))
        out = xp.reshape(be.layer_norm(xg, None, None, normalized_ndim=1, eps=self.eps), shape)
        if self.elementwise_affine:
            out = out * params["weight"] + params["bias"]
        return out


class Dropout(Module):
    """Inverted dropout: zero each element with probability ``p`` and scale by ``1/(1-p)``.

    Identity unless ``train=True``; then a ``key`` is required (explicit randomness).
    """

    has_params = False

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p!r}")
        self.p = float(p)

    @property
    def has_train_mode(self) -> bool:  # type: ignore[override]
        return self.p > 0.0

    def forward(self, be, params, x, *, key=None, train=False):
        if not train or self.p == 0.0:
            return x
        if key is None:
            raise ValueError("Dropout: train=True needs an explicit key (apply(..., key=be.key(seed)))")
        keep = be.bernoulli(key, 1.0 - self.p, tuple(x.shape), device=be.device_of(x))
        return be.xp.where(keep, x / (1.0 - self.p), be.xp.zeros_like(x))
