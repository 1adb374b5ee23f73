"""Explicit-key randomness on JAX (``jax.random``, threefry keys)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from duogard.backend import check_draw_rows

from ._arrays import as_dtype, resolve_device


def key(seed: int):
    return jax.random.PRNGKey(int(seed))


def split(key, num: int = 2):
    return jax.random.split(key, num)


def fold_in(key, data: int):
    return jax.random.fold_in(key, data)


def key_data(key) -> np.ndarray:
    return np.asarray(
        jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key, dtype=np.uint32
    )


def key_from_data(data):
    return jnp.asarray(np.asarray(data, dtype=np.uint32))


def _placed(x, device):
    return x if device is None else jax.device_put(x, resolve_device(device))


def _draw_shape(shape):
    """A 2-D shape with ``prod(shape)`` numbers and a long leading axis, to draw in.

    threefry numbers the draws by their flat (row-major) index, so a draw in any shape of the
    same size holds the same numbers in the same order (a test checks it). XLA's CPU code
    draws faster in such a shape than in ``(1, n)`` or ``(n,)``.
    """
    n = int(np.prod(shape, dtype=np.int64))
    for c in (1024, 512, 256, 128, 64, 32, 16, 8):
        if n % c == 0 and n // c >= 8:
            return (n // c, c)
    return tuple(shape)


def normal(key, shape, dtype="float32", device=None):
    shape = tuple(int(d) for d in shape)
    v = jax.random.normal(key, _draw_shape(shape), dtype=as_dtype(dtype))
    return _placed(jnp.reshape(v, shape), device)


def rademacher(key, shape, dtype="float32", device=None):
    # 32 signs from each 32-bit word. The words come from a counter hash (two rounds of a
    # bijective 32-bit mixer over the word index, seeded with 64 threefry bits of ``key``):
    # threefry for every word took most of the time of the draw, the hash takes little
    shape = tuple(shape)
    n = int(np.prod(shape))
    seed = jax.random.bits(key, (2,), jnp.uint32)
    index = jnp.arange((n + 31) // 32, dtype=jnp.uint32)
    words = _mix32(_mix32(index * jnp.uint32(0x9E3779B9) + seed[0]) ^ seed[1])
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    signs = bits.reshape(-1)[:n].astype(as_dtype(dtype)) * 2 - 1
    return _placed(signs.reshape(shape), device)


def _mix32(x):
    # a bijective avalanche mixer on uint32 (xor-shift / multiply, "lowbias32" constants)
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def draw_rows(kind, keys, sizes, rows, dtype="float32", device=None):
    # block j is kind(keys[j], (rows, sizes[j])); under jit XLA writes the draws straight into
    # the concatenation
    sizes = check_draw_rows(kind, keys, sizes)
    draw = normal if kind == "normal" else rademacher
    blocks = [draw(k, (int(rows), s), dtype=dtype) for k, s in zip(keys, sizes)]
    return _placed(jnp.concatenate(blocks, axis=1), device)


def uniform(key, shape, dtype="float32", minval=0.0, maxval=1.0, device=None):
    u = jax.random.uniform(key, tuple(shape), dtype=as_dtype(dtype), minval=minval, maxval=maxval)
    return _placed(u, device)


def bernoulli(key, p, shape, device=None):
    return _placed(jax.random.bernoulli(key, p, tuple(shape)), device)
