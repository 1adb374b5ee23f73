"""Layers of MLP-Mixer-style models: patches as tokens, mixing across tokens or within groups.

Token arrays are ``(batch, tokens, channels)``: :class:`Patches` makes them from NCHW images,
:class:`TokenLinear` mixes the tokens (each channel on its own), :class:`GroupedLinear` mixes
the channels within groups (each token on its own), :class:`TokenMean` averages the tokens.
"""

from __future__ import annotations

from duogard.nn._linear import _positive_int, uniform_init
from duogard.nn._module import Module

__all__ = ["Patches", "TokenLinear", "GroupedLinear", "TokenMean"]


def _check_tokens(layer: str, shape: tuple) -> None:
    if len(shape) != 3:
        raise ValueError(f"{layer}: expected (batch, tokens, channels), got shape {tuple(shape)}")


class Patches(Module):
    """NCHW images cut into non-overlapping ``size`` x ``size`` patches, one token each:
    ``(B, C, H, W)`` -> ``(B, (H/size)(W/size), C·size·size)``, tokens in row-major order of
    the patch grid, each token's features in ``(C, row, column)`` order. No parameters: a
    :class:`duogard.nn.Linear` after it is the patch embedding (one weight shared by the tokens).
    """

    has_params = False

    def __init__(self, size: int):
        self.size = _positive_int("Patches", "size", size)

    def _grid(self, shape) -> tuple[int, int]:
        s = self.size
        if len(shape) != 4 or shape[2] % s or shape[3] % s:
            raise ValueError(
                f"Patches({s}): expected NCHW images with height and width divisible by {s}, "
                f"got shape {tuple(shape)}"
            )
        return shape[2] // s, shape[3] // s

    def init_params(self, rng, input_shape, dtype):
        gh, gw = self._grid(input_shape)
        return {}, (input_shape[0], gh * gw, input_shape[1] * self.size * self.size)

    def forward(self, be, params, x, *, key=None, train=False):
        xp, s = be.xp, self.size
        gh, gw = self._grid(tuple(x.shape))
        b, c = x.shape[0], x.shape[1]
        x = xp.reshape(x, (b, c, gh, s, gw, s))
        x = xp.permute_dims(x, (0, 2, 4, 1, 3, 5))  # (B, gh, gw, C, s, s)
        return xp.reshape(x, (b, gh * gw, c * s * s))


class TokenLinear(Module):
    """A linear map across the tokens, the same for every channel (MLP-Mixer's token mixing):
    ``y[b, :, c] = W x[b, :, c] + bias`` with ``weight`` ``(out_tokens, tokens)`` and ``bias``
    ``(out_tokens,)`` (torch's Linear init, fan-in ``tokens``). Input ``(B, tokens, C)``;
    ``out_tokens=None`` (default) keeps the number of tokens.
    """

    def __init__(self, out_tokens: int | None = None, *, bias: bool = True):
        self.out_tokens = (
            None if out_tokens is None else _positive_int("TokenLinear", "out_tokens", out_tokens)
        )
        self.bias = bool(bias)

    def init_params(self, rng, input_shape, dtype):
        _check_tokens(f"TokenLinear({self.out_tokens})", input_shape)
        t = int(input_shape[1])
        out = t if self.out_tokens is None else self.out_tokens
        params = {"weight": uniform_init(rng, (out, t), t, dtype)}
        if self.bias:
            params["bias"] = uniform_init(rng, (out,), t, dtype)
        return params, (input_shape[0], out, input_shape[2])

    def forward(self, be, params, x, *, key=None, train=False):
        w = params["weight"]
        if x.ndim != 3 or x.shape[1] != w.shape[1]:
            raise ValueError(
                f"TokenLinear({self.out_tokens}): expected input (batch, {w.shape[1]}, channels), "
                f"got {tuple(x.shape)}"
            )
        y = be.xp.matmul(w, x)  # (T', T) @ (B, T, C)
        return y + params["bias"][:, None] if self.bias else y


class GroupedLinear(Module):
    """A block-diagonal linear map over the last axis: its ``in`` features and ``out_features``
    outputs are split into ``groups`` consecutive groups, and output group g is a linear map of
    input group g only (torch's ``Conv1d(groups=...)`` with a 1-wide kernel). ``weight`` is
    ``(out_features, in / groups)`` (row o belongs to group ``o // (out_features / groups)``),
    ``bias`` ``(out_features,)``; torch's init with fan-in ``in / groups``.
    """

    def __init__(self, out_features: int, groups: int, *, bias: bool = True):
        self.out_features = _positive_int("GroupedLinear", "out_features", out_features)
        self.groups = _positive_int("GroupedLinear", "groups", groups)
        self.bias = bool(bias)
        if self.out_features % self.groups:
            raise ValueError(
                f"GroupedLinear: groups {self.groups} must divide out_features {self.out_features}"
            )

    def init_params(self, rng, input_shape, dtype):
        name = f"GroupedLinear({self.out_features}, groups={self.groups})"
        if len(input_shape) < 1 or input_shape[-1] <= 0 or input_shape[-1] % self.groups:
            raise ValueError(
                f"{name}: expected an input (..., in_features) with in_features divisible by "
                f"{self.groups}, got shape {tuple(input_shape)}"
            )
        fan_in = int(input_shape[-1]) // self.groups
        params = {"weight": uniform_init(rng, (self.out_features, fan_in), fan_in, dtype)}
        if self.bias:
            params["bias"] = uniform_init(rng, (self.out_features,), fan_in, dtype)
        return params, (*input_shape[:-1], self.out_features)

    def forward(self, be, params, x, *, key=None, train=False):
        xp, g = be.xp, self.groups
        w = params["weight"]
        if x.ndim < 1 or x.shape[-1] != g * w.shape[1]:
            raise ValueError(
                f"GroupedLinear({self.out_features}, groups={g}): expected input shape "
                f"(..., {g * w.shape[1]}), got {tuple(x.shape)}"
            )
        lead = tuple(x.shape[:-1])
        xg = xp.permute_dims(xp.reshape(x, (-1, g, w.shape[1])), (1, 0, 2))  # (G, N, in/G)
        wg = xp.reshape(w, (g, self.out_features // g, w.shape[1]))  # (G, out/G, in/G)
        y = xp.permute_dims(xp.matmul(xg, xp.matrix_transpose(wg)), (1, 0, 2))  # (N, G, out/G)
        y = xp.reshape(y, (*lead, self.out_features))
        return y + params["bias"] if self.bias else y


class TokenMean(Module):
    """The mean over the tokens: ``(B, tokens, C)`` -> ``(B, C)`` (a mixer's global pooling)."""

    has_params = False

    def init_params(self, rng, input_shape, dtype):
        _check_tokens("TokenMean", input_shape)
        return {}, (input_shape[0], input_shape[2])

    def forward(self, be, params, x, *, key=None, train=False):
        _check_tokens("TokenMean", tuple(x.shape))
        return be.xp.mean(x, axis=1)
