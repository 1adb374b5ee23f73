"""The portable generator: Philox-4x32-10, specified bit for bit (NumPy reference).

Every backend draws its tangents, perturbations and dropout masks with this generator by default
(``generator="portable"``), each written with its framework's integer ops on the arrays' device,
so the same key gives the same numbers on every framework: signs and uniform bits equal bit for
bit, normal numbers equal to float rounding (``log``, ``cos`` and ``sin`` differ in the last bit
between libraries). This module is the specification and the reference the tests check the
backends against; the torch backend also derives its keys here, on the host.

Specification
-------------
- **Block function**: Philox-4x32 with 10 rounds (Salmon et al. 2011, *Parallel random numbers:
  as easy as 1, 2, 3*; the Random123 constants ``M = (0xD2511F53, 0xCD9E8D57)``, ``W =
  (0x9E3779B9, 0xBB67AE85)``): a counter of four 32-bit words and a key of two give four words.
- **Keys** are two 32-bit words ``(hi, lo)``. ``key(seed)`` is the seed modulo 2**64 split into
  its high and low words (``key(0) = (0, 0)``, ``key(7) = (0, 7)``, as ``jax.random.PRNGKey``).
- **split(key, num)**: key ``i`` is the first two words of ``philox(key, (i, 0, 0, 1))``.
- **fold_in(key, data)**: the first two words of ``philox(key, (lo, hi, 0, 2))`` with ``(hi, lo)``
  the words of ``data`` modulo 2**64.
- **words(key, n)**: ``n`` words; word ``j`` is word ``j % 4`` of ``philox(key, (j // 4, 0, 0, 0))``.
- **Working precision**: uniform and normal numbers are computed in float64 for a float64 draw
  and in float32 for every other dtype; a float16 or bfloat16 draw is the float32 draw rounded
  to nearest (even). (Their own arithmetic fails: ``2**23`` overflows float16, and bfloat16
  rounds most ``u`` to a few values and some to 1.)
- **uniform**: word ``w`` gives ``u = (2 (w >> 9) + 1) / 2**24``, in the open interval (0, 1)
  and exact in float32; ``uniform(key, n)`` takes ``words(key, n)``. Rounded to float16 or
  bfloat16, ``u`` is then capped at the dtype's largest number below 1, so it stays below 1.
- **normal**: Box-Muller on pairs of words: ``n`` numbers take ``words(key, 2 ceil(n / 2))``;
  words ``2p`` and ``2p + 1`` give ``r = sqrt(-2 log u(w[2p]))``, ``t = 2 pi u(w[2p + 1])``, then
  number ``2p`` is ``r cos t`` and number ``2p + 1`` is ``r sin t`` (in the working precision,
  then rounded to the output dtype; the last number is dropped when ``n`` is odd).
- **rademacher**: ``n`` signs take ``words(key, ceil(n / 32))``; sign ``j`` is ``+1`` where bit
  ``j % 32`` of word ``j // 32`` is set, ``-1`` where it is clear (exact in every dtype).
- **bernoulli(key, p, n)**: ``uniform(key, n) < p``.
- A draw of ``shape`` is the flat draw of ``prod(shape)`` numbers in row-major order.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "PHILOX_M",
    "PHILOX_W",
    "ROUNDS",
    "SPLIT_TAG",
    "FOLD_TAG",
    "philox4x32",
    "key_words",
    "split_words",
    "fold_in_words",
    "fold_in_many_words",
    "words",
    "words_many",
    "draw_many",
    "positions",
    "kept",
    "uniform",
    "normal",
    "rademacher",
    "working_dtype",
    "below_one",
]

PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
ROUNDS = 10
SPLIT_TAG = 1  # counter word 3 of a split
FOLD_TAG = 2  # counter word 3 of a fold_in
_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1


def philox4x32(counter, key) -> np.ndarray:
    """Philox-4x32-10 of ``counter`` (four uint32 arrays, broadcast together) under ``key``
    (two words, each an int or a uint32 array broadcast with the counter: one key per
    element): the four output words, stacked on a first axis of 4.
    """
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.asarray(k, dtype=np.uint64) & np.uint64(_MASK32) for k in key)
    m0, m1 = (np.uint64(m) for m in PHILOX_M)
    w0, w1 = (np.uint64(w) for w in PHILOX_W)
    mask = np.uint64(_MASK32)
    for _ in range(ROUNDS):
        p0, p1 = c0 * m0, c2 * m1  # < 2**64: exact in uint64
        hi0, lo0 = p0 >> np.uint64(32), p0 & mask
        hi1, lo1 = p1 >> np.uint64(32), p1 & mask
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
    return np.stack(np.broadcast_arrays(c0, c1, c2, c3)).astype(np.uint32)


def key_words(seed: int) -> np.ndarray:
    """``key(seed)``: the two words ``(hi, lo)`` of ``seed`` modulo 2**64."""
    z = int(seed) & _MASK64
    return np.array([z >> 32, z & _MASK32], dtype=np.uint32)


def _philox_ints(c0: int, c1: int, c2: int, c3: int, key) -> tuple[int, int, int, int]:
    """:func:`philox4x32` of one counter, in Python ints: a key derivation is one block, which
    NumPy's per-call overhead makes ~10x slower than plain integer arithmetic.
    """
    k0, k1 = (int(k) & _MASK32 for k in key)
    m0, m1 = PHILOX_M
    for _ in range(ROUNDS):
        p0, p1 = c0 * m0, c2 * m1
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & _MASK32
        k0, k1 = (k0 + PHILOX_W[0]) & _MASK32, (k1 + PHILOX_W[1]) & _MASK32
    return c0, c1, c2, c3


def split_words(key, num: int) -> np.ndarray:
    """``split(key, num)``: a ``(num, 2)`` uint32 array of keys."""
    if int(num) <= 8:  # the usual case: a few keys, one block each
        return np.array([_philox_ints(i, 0, 0, SPLIT_TAG, key)[:2] for i in range(int(num))], np.uint32)
    i = np.arange(int(num), dtype=np.uint64)
    out = philox4x32((i, 0, 0, SPLIT_TAG), key)
    return np.ascontiguousarray(out[:2].T)


def fold_in_words(key, data: int) -> np.ndarray:
    """``fold_in(key, data)``: two uint32 words."""
    z = int(data) & _MASK64
    return np.array(_philox_ints(z & _MASK32, z >> 32, 0, FOLD_TAG, key)[:2], np.uint32)


def fold_in_many_words(key, data) -> np.ndarray:
    """``fold_in(key, d)`` for every ``d`` in ``data``: a ``(len(data), 2)`` uint32 array."""
    out = np.empty((len(data), 2), dtype=np.uint32)
    for i, d in enumerate(data):
        out[i] = fold_in_words(key, d)
    return out


def words(key, n: int) -> np.ndarray:
    """The first ``n`` words of ``key``'s stream."""
    blocks = -(-int(n) // 4)
    out = philox4x32((np.arange(blocks, dtype=np.uint64), 0, 0, 0), key)
    return out.T.reshape(-1)[: int(n)]


def positions(counts) -> np.ndarray:
    """For ``counts[j]`` elements of each key, concatenated: each element's index in its own key's run."""
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    return np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


def kept(counts, padded) -> np.ndarray:
    """Where the first ``counts[j]`` elements of each key stand in the concatenation of the keys'
    ``padded[j]``-long runs (a draw rounds each key's numbers up to whole words or blocks).
    """
    counts, padded = (np.asarray(a, dtype=np.int64).reshape(-1) for a in (counts, padded))
    return np.repeat(np.cumsum(padded) - padded, counts) + positions(counts)


def words_many(keys, counts) -> np.ndarray:
    """``words(keys[j], counts[j])`` for every ``j``, concatenated, in one vectorised pass:
    ``keys`` is a ``(B, 2)`` array of keys, ``counts`` their word counts.
    """
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1, 2)
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    blocks = -(-counts // 4)  # Philox blocks per key
    owner = np.repeat(np.arange(len(counts)), blocks)
    out = philox4x32((positions(blocks).astype(np.uint64), 0, 0, 0), (keys[owner, 0], keys[owner, 1]))
    flat = out.T.reshape(-1)  # every key's words, padded to whole blocks
    return flat[kept(counts, 4 * blocks)]


def draw_many(kind: str, keys, counts, dtype=np.float32) -> np.ndarray:
    """``kind(keys[j], counts[j])`` (``"normal"``, ``"rademacher"`` or ``"uniform"``) for every
    ``j``, concatenated: the same numbers as one draw per key, in one vectorised pass.
    """
    dtype = np.dtype(dtype).type
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    if kind == "uniform":
        return _uniform_of(words_many(keys, counts), dtype)
    per = 2 if kind == "normal" else 32  # numbers per pair of words / per word
    took = per * -(-counts // per)  # each key's numbers before its last ones are dropped
    w = words_many(keys, took // (1 if kind == "normal" else 32))
    if kind == "normal":
        numbers = _box_muller(w, dtype)
    elif kind == "rademacher":
        bits = (w[:, None] >> np.arange(32, dtype=np.uint32)) & np.uint32(1)
        numbers = (bits.reshape(-1).astype(dtype) * 2 - 1).astype(dtype)
    else:
        raise ValueError(f"draw_many: kind must be 'normal', 'rademacher' or 'uniform', got {kind!r}")
    return numbers[kept(counts, took)]


def working_dtype(dtype):
    """The NumPy dtype a draw in ``dtype`` computes in: float64 for float64, else float32."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


_MANTISSA_BITS = {"float16": 10, "bfloat16": 7, "float32": 23, "float64": 52}


def below_one(dtype) -> float:
    """The largest number below 1 in ``dtype`` (by name: ``"float16"``, ``"bfloat16"``,
    ``"float32"`` or ``"float64"``, or a NumPy dtype): a float16 or bfloat16 uniform's cap.
    """
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    return 1.0 - 2.0 ** -(_MANTISSA_BITS[name] + 1)


def _unit(w: np.ndarray, dtype) -> np.ndarray:
    return ((w >> np.uint32(9)).astype(dtype) * 2 + 1) * dtype(2.0**-24)


def _uniform_of(w: np.ndarray, dtype) -> np.ndarray:
    """The uniform numbers of words ``w`` in ``dtype`` (rounded from the working precision)."""
    work = working_dtype(dtype)
    u = _unit(w, work)
    if np.dtype(dtype).itemsize >= 4:
        return u.astype(dtype)
    return np.minimum(u.astype(dtype), np.asarray(below_one(dtype), dtype=dtype))


def _box_muller(w: np.ndarray, dtype) -> np.ndarray:
    """Box-Muller of the word pairs ``w`` (even length): two numbers a pair, in ``dtype``."""
    work = working_dtype(dtype)
    u = _unit(w, work).reshape(-1, 2)
    r = np.sqrt(work(-2) * np.log(u[:, 0]))
    t = work(2 * np.pi) * u[:, 1]
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1).reshape(-1).astype(dtype)


def uniform(key, n: int, dtype=np.float32) -> np.ndarray:
    """``n`` uniform numbers in (0, 1)."""
    return _uniform_of(words(key, n), np.dtype(dtype).type)


def normal(key, n: int, dtype=np.float32) -> np.ndarray:
    """``n`` standard normal numbers (Box-Muller in the working precision, then ``dtype``)."""
    pairs = -(-int(n) // 2)
    return _box_muller(words(key, 2 * pairs), np.dtype(dtype).type)[: int(n)]


def rademacher(key, n: int, dtype=np.float32) -> np.ndarray:
    """``n`` signs, +1 or -1."""
    w = words(key, -(-int(n) // 32))
    bits = (w[:, None] >> np.arange(32, dtype=np.uint32)) & np.uint32(1)
    return (bits.reshape(-1)[: int(n)].astype(dtype) * 2 - 1).astype(dtype)
