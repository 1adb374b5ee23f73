"""Explicit-key randomness on JAX.

Keys are uint32 pairs; ``key``, ``split`` and ``fold_in`` and the default (``"portable"``) draws
are duogard's Philox-4x32-10 generator (:mod:`duogard.backend._philox`, the specification),
written here with ``jax.numpy`` integer ops so that they trace and fuse under ``jit``: the same
numbers as on every other backend. ``generator="native"`` draws with ``jax.random`` instead,
taking the key's words as a threefry key.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from duogard.backend import _philox as spec
from duogard.backend.authoring import check_draw_rows, check_generator

from ._arrays import as_dtype, resolve_device

_U32 = jnp.uint32


def _mulhilo(a, m: int):
    """``(hi, lo)`` words of ``a * m`` for uint32 ``a`` and a constant ``m``, in uint32 ops
    (16-bit halves), so no 64-bit type is needed with x64 off.
    """
    mh, ml = _U32(m >> 16), _U32(m & 0xFFFF)
    ah, al = a >> 16, a & _U32(0xFFFF)
    t = al * ml
    u = ah * ml + (t >> 16)
    v = al * mh + (u & _U32(0xFFFF))
    return ah * mh + (u >> 16) + (v >> 16), a * _U32(m)


def _philox(c0, c1, c2, c3, key):
    k0, k1 = key[0], key[1]
    for _ in range(spec.ROUNDS):
        hi0, lo0 = _mulhilo(c0, spec.PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, spec.PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = k0 + _U32(spec.PHILOX_W[0]), k1 + _U32(spec.PHILOX_W[1])
    return c0, c1, c2, c3


def _as_key(key):
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return key.astype(_U32)


def key(seed: int):
    return jnp.asarray(spec.key_words(seed))


def _concrete_words(key):
    """``key``'s two words as Python ints when they are known now (not traced under jit), else
    None. Keys derived from concrete keys are computed on the host by the NumPy specification:
    run eagerly, the rounds below cost ~100 dispatches (about 10 ms a ``fold_in``), which a
    training loop pays every step.
    """
    if isinstance(key, jax.core.Tracer):
        return None
    k = np.asarray(_as_key(key)).reshape(-1)
    return int(k[0]), int(k[1])


def split(key, num: int = 2):
    words = _concrete_words(key)
    if words is not None:
        return jnp.asarray(spec.split_words(words, int(num)))
    c0 = jnp.arange(int(num), dtype=_U32)
    zero = jnp.zeros((), _U32)
    w0, w1, _, _ = _philox(c0, zero, zero, _U32(spec.SPLIT_TAG), _as_key(key))
    return jnp.stack([w0, jnp.broadcast_to(w1, w0.shape)], axis=1)


def _data_words(data):
    if isinstance(data, (int, np.integer)):
        z = int(data) & ((1 << 64) - 1)
        return _U32(z & 0xFFFFFFFF), _U32(z >> 32)
    data = jnp.asarray(data)
    lo = data.astype(_U32)
    if data.dtype.itemsize == 8:
        return lo, (data >> 32).astype(_U32)
    signed = jnp.issubdtype(data.dtype, jnp.signedinteger)
    return lo, jnp.where(data < 0, _U32(0xFFFFFFFF), _U32(0)) if signed else jnp.zeros((), _U32)


def fold_in(key, data: int):
    words = _concrete_words(key) if isinstance(data, (int, np.integer)) else None
    if words is not None:
        return jnp.asarray(spec.fold_in_words(words, int(data)))
    lo, hi = _data_words(data)
    w0, w1, _, _ = _philox(lo, hi, jnp.zeros((), _U32), _U32(spec.FOLD_TAG), _as_key(key))
    return jnp.stack([w0, w1])


def fold_in_many(key, data):
    data = [int(d) for d in data]
    words = _concrete_words(key)
    if words is not None:
        return jnp.asarray(spec.fold_in_many_words(words, data))
    z = np.asarray([d & ((1 << 64) - 1) for d in data], dtype=np.uint64).reshape(-1)
    lo, hi = jnp.asarray((z & 0xFFFFFFFF).astype(np.uint32)), jnp.asarray((z >> 32).astype(np.uint32))
    w0, w1, _, _ = _philox(lo, hi, jnp.zeros((), _U32), _U32(spec.FOLD_TAG), _as_key(key))
    return jnp.stack([w0, w1], axis=1)


def key_data(key) -> np.ndarray:
    return np.asarray(_as_key(key), dtype=np.uint32)


def key_from_data(data):
    return jnp.asarray(np.asarray(data, dtype=np.uint32))


def _words(key, n: int):
    """The first ``n`` words of ``key``'s stream (the spec's ``words``).

    Each word runs the rounds of its own block and keeps its lane: four times the rounds, but
    one fused single-output loop. (Built the plain way, four lane arrays then interleaved,
    XLA's CPU code fused the interleave with the rounds and ran 20-30 times slower.) The words
    end in a division by a traced one: XLA counts a division as expensive and then does not
    fuse the words into consumers that read each word many times (the 32 signs of a word, the
    pairs of Box-Muller), which would run the rounds again for each of them
    (``optimization_barrier`` does not stop that fusion on CPU).
    """
    key = _as_key(key)
    j = jnp.arange(n, dtype=_U32)
    zero = jnp.zeros((), _U32)
    return _lane(_philox(j >> 2, zero, zero, zero, key), j) // _traced_one(key)


def _lane(c, j):
    """Word ``j`` of a stream from its block's four words ``c``: lane ``j % 4``."""
    lane = j & _U32(3)
    return jnp.where(lane == 0, c[0], jnp.where(lane == 1, c[1], jnp.where(lane == 2, c[2], c[3])))


def _traced_one(key):
    """1, computed from ``key`` so that XLA cannot fold it: dividing a draw by it changes no bit
    but ends the draw in an op XLA counts as expensive, which it then does not duplicate into
    consumers that read each element many times (a rank-1 tangent's outer product reads each
    factor ``out`` or ``in`` times; fused, the rounds ran once per read).
    """
    key = _as_key(key)
    return (key[0] | _U32(1)) // (key[0] | _U32(1))


def _unit(w, dtype):
    return ((w >> 9).astype(dtype) * 2 + 1) * jnp.asarray(2.0**-24, dtype)


def _working(dtype):
    """The dtype a draw in ``dtype`` computes in (the spec's ``working_dtype``): float16 and
    bfloat16 draws are float32 ones rounded (their own arithmetic overflows or rounds to 1).
    """
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _uniform_of(w, dtype):
    """The uniform numbers of words ``w`` in ``dtype``: rounded from the working precision and,
    in float16 or bfloat16, capped below 1.
    """
    u = _unit(w, _working(dtype)).astype(dtype)
    if jnp.dtype(dtype).itemsize >= 4:
        return u
    return jnp.minimum(u, jnp.asarray(spec.below_one(jnp.dtype(dtype).name), dtype))


def _placed(x, device):
    return x if device is None else jax.device_put(x, resolve_device(device))


def _portable_normal(key, n: int, dtype):
    # number i from its own block's rounds (block i // 4; words 2p, 2p + 1 of its pair p = i // 2
    # are lanes 0, 1 or 2, 3): one fused single-output loop, as in _words
    i = jnp.arange(n, dtype=_U32)
    zero = jnp.zeros((), _U32)
    c = _philox(i >> 2, zero, zero, zero, _as_key(key))
    return _unfused(_box_muller(c, i, _working(dtype)), key).astype(dtype)


def _box_muller(c, i, dtype):
    """Normal number ``i`` of a stream from its block's four words ``c`` (words 2p and 2p + 1
    of its pair p = i // 2 are lanes 0, 1 or 2, 3), computed in ``dtype`` (a working dtype).
    """
    second = ((i >> 1) & _U32(1)) == 1
    r = jnp.sqrt(jnp.asarray(-2, dtype) * jnp.log(_unit(jnp.where(second, c[2], c[0]), dtype)))
    t = jnp.asarray(2 * np.pi, dtype) * _unit(jnp.where(second, c[3], c[1]), dtype)
    return jnp.where((i & _U32(1)) == 1, r * jnp.sin(t), r * jnp.cos(t))


def _unfused(x, key):
    """``x`` bit for bit, through an integer division by a traced one (see :func:`_traced_one`):
    XLA counts an integer division as expensive (a float one, sines and logarithms it fuses
    into every reader), so the draw is computed once, not once per element of an outer product.
    """
    bits = jnp.uint32 if x.dtype.itemsize == 4 else jnp.uint64
    one = _traced_one(key).astype(bits)
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(x, bits) // one, x.dtype)


def _portable_signs(key, n: int, dtype):
    w = _words(key, -(-n // 32))
    bits = (w[:, None] >> jnp.arange(32, dtype=_U32)) & _U32(1)
    return bits.reshape(-1)[:n].astype(dtype) * 2 - 1


def _native_key(key):
    return _as_key(key)  # the two words as a raw threefry key


def _draw_shape(shape):
    """A 2-D shape with ``prod(shape)`` numbers and a long leading axis, to draw in.

    threefry numbers the draws by their flat (row-major) index, so a draw in any shape of the
    same size holds the same numbers in the same order (a test checks it). XLA's CPU code
    draws faster in such a shape than in ``(1, n)`` or ``(n,)``.
    """
    n = math.prod(shape)
    for c in (1024, 512, 256, 128, 64, 32, 16, 8):
        if n % c == 0 and n // c >= 8:
            return (n // c, c)
    return tuple(shape)


def _draw(native, portable, key, shape, dtype, device, generator):
    shape, dtype = tuple(int(d) for d in shape), as_dtype(dtype)
    if check_generator(generator) == "native":
        v = native(_native_key(key), _draw_shape(shape), dtype=dtype)
    else:
        v = portable(key, math.prod(shape), dtype)
    return _placed(jnp.reshape(v, shape), device)


def normal(key, shape, dtype="float32", device=None, generator="portable"):
    return _draw(jax.random.normal, _portable_normal, key, shape, dtype, device, generator)


def rademacher(key, shape, dtype="float32", device=None, generator="portable"):
    return _draw(jax.random.rademacher, _portable_signs, key, shape, dtype, device, generator)


_BATCH_MAX = 1 << 16  # numbers of a block from which draw_rows draws it on its own


def draw_rows(kind, keys, sizes, rows, dtype="float32", device=None, generator="portable"):
    # block j is kind(keys[j], (rows, sizes[j])); under jit XLA writes the draws straight into
    # the concatenation. Portable blocks below _BATCH_MAX numbers are drawn together, in one
    # pass of the rounds with a key per element: a program's compile time grows with each
    # separate pass (about 0.15 s), and a model has a few large leaves and many small ones
    sizes = check_draw_rows(kind, keys, sizes)
    rows, dtype = int(rows), as_dtype(dtype)
    draw = normal if kind == "normal" else rademacher
    blocks: list = [None] * len(sizes)
    small = [j for j, s in enumerate(sizes) if rows * s < _BATCH_MAX]
    if check_generator(generator) == "portable" and len(small) > 1:
        counts = [rows * sizes[j] for j in small]
        flat = _portable_many(kind, _as_key(jnp.stack([_as_key(keys[j]) for j in small])), counts, dtype)
        for j, start, n in zip(small, np.cumsum(counts) - counts, counts):
            blocks[j] = jnp.reshape(flat[start : start + n], (rows, sizes[j]))
    for j, (k, size) in enumerate(zip(keys, sizes)):
        if blocks[j] is None:
            blocks[j] = draw(k, (rows, size), dtype=dtype, generator=generator)
    return _placed(blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1), device)


def _per_element(values, counts):
    """``values[j]`` repeated ``counts[j]`` times, by selects on a position (a gather of the
    few values costs more in XLA's CPU loops than a select per block).
    """
    pos = jnp.arange(int(np.sum(counts)), dtype=jnp.int32)
    out = jnp.broadcast_to(values[-1], pos.shape)
    ends = np.cumsum(counts)
    for j in range(len(counts) - 2, -1, -1):
        out = jnp.where(pos < int(ends[j]), values[j], out)
    return out


def _portable_many(kind, keys, counts, dtype):
    """``kind(keys[j], counts[j])`` for every ``j``, concatenated (the spec's ``draw_many``): one
    pass of the rounds, each element with its own key (``keys`` is ``(B, 2)``).
    """
    counts = np.asarray(counts, dtype=np.int64)
    per = 2 if kind == "normal" else 32
    took = per * -(-counts // per)  # numbers each key gives before its last ones are dropped
    nwords = took if kind == "normal" else took // 32
    k0, k1 = _per_element(keys[:, 0], nwords), _per_element(keys[:, 1], nwords)
    t = jnp.asarray(spec.positions(nwords).astype(np.uint32))  # each word's index in its stream
    zero = jnp.zeros((), _U32)
    c = _philox(t >> 2, zero, zero, zero, (k0, k1))
    if kind == "normal":  # as _portable_normal: number t of its key from its own block
        numbers = _unfused(_box_muller(c, t, _working(dtype)), keys[0]).astype(dtype)
    else:  # as _words then _portable_signs: word t's lane, then its 32 bits
        w = _lane(c, t) // _traced_one(keys[0])
        bits = (w[:, None] >> jnp.arange(32, dtype=_U32)) & _U32(1)
        numbers = bits.reshape(-1).astype(dtype) * 2 - 1
    if int(took.sum()) == int(counts.sum()):  # nothing dropped: no gather
        return numbers
    return numbers[jnp.asarray(spec.kept(counts, took).astype(np.int32))]


def uniform(key, shape, dtype="float32", minval=0.0, maxval=1.0, device=None, generator="portable"):
    shape, dtype = tuple(int(d) for d in shape), as_dtype(dtype)
    if check_generator(generator) == "native":
        return _placed(jax.random.uniform(_native_key(key), shape, dtype, minval, maxval), device)
    u = _uniform_of(_words(key, math.prod(shape)), dtype).reshape(shape)
    return _placed(u * (maxval - minval) + minval, device)


def bernoulli(key, p, shape, device=None, generator="portable"):
    shape = tuple(int(d) for d in shape)
    if check_generator(generator) == "native":
        return _placed(jax.random.bernoulli(_native_key(key), p, shape), device)
    return _placed(uniform(key, shape) < p, device)
