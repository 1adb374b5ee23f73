"""Explicit-key randomness on PyTorch.

A key is a CPU int64 tensor of two 32-bit words; every draw seeds a fresh ``torch.Generator``
from a splitmix64 hash of its key, so the same key gives the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from duogard.backend import check_draw_rows

from ._arrays import as_dtype

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _key_int(key) -> int:
    hi, lo = (int(v) for v in key.tolist())
    return ((hi & 0xFFFFFFFF) << 32) | (lo & 0xFFFFFFFF)


def _make_key(z: int):
    return torch.tensor([(z >> 32) & 0xFFFFFFFF, z & 0xFFFFFFFF], dtype=torch.int64)


# key arithmetic runs on the host with Python ints: torch.compile must not trace it (it would
# turn the ints into symbols that Generator.manual_seed refuses); it runs eagerly in a graph break
@torch.compiler.disable
def _generator(key, device):
    device = torch.device("cpu") if device is None else torch.device(device)
    g = torch.Generator(device=device)
    g.manual_seed(_splitmix64(_key_int(key)) & 0x7FFFFFFFFFFFFFFF)
    return g


def key(seed: int):
    return _make_key(int(seed) & _MASK64)


@torch.compiler.disable
def split(key, num: int = 2):
    base = _key_int(key)
    return torch.stack([_make_key(_splitmix64(base ^ _splitmix64(i + 1))) for i in range(num)])


@torch.compiler.disable
def fold_in(key, data: int):
    return _make_key(_splitmix64(_key_int(key) ^ _splitmix64((int(data) + 0x632BE5AB) & _MASK64)))


def key_data(key) -> np.ndarray:
    return key.numpy().astype(np.uint32)


def key_from_data(data):
    return torch.as_tensor(np.asarray(data, dtype=np.uint32).astype(np.int64))


def normal(key, shape, dtype="float32", device=None):
    return torch.randn(tuple(shape), generator=_generator(key, device), dtype=as_dtype(dtype), device=device)


def rademacher(key, shape, dtype="float32", device=None):
    # 64 signs from each random int64 word, unpacked byte by byte through a (256, 8) table of
    # signs: much faster than a draw per element (which dominates torch.randn)
    shape = tuple(shape)
    n = int(np.prod(shape))
    words = torch.randint(
        -(2**63),
        2**63 - 1,
        ((n + 63) // 64,),
        generator=_generator(key, device),
        dtype=torch.int64,
        device=device,
    )
    table = _sign_table(as_dtype(dtype), words.device)
    signs = torch.index_select(table, 0, words.view(torch.uint8).long())  # (bytes, 8)
    return signs.reshape(-1)[:n].reshape(shape)


_SIGN_TABLES: dict = {}


def _sign_table(dtype, device):
    """Row b holds the eight signs (+-1) of byte b's bits: a constant, cached per dtype and device."""
    k = (dtype, str(device))
    if k not in _SIGN_TABLES:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        _SIGN_TABLES[k] = (bits * 2 - 1).to(dtype=dtype, device=device)
    return _SIGN_TABLES[k]


_ROW_FILL_MIN = 1 << 16  # numbers per row from which draw_rows fills a normal block row by row


@torch.compiler.disable
def draw_rows(kind, keys, sizes, rows, dtype="float32", device=None):
    # Large normal blocks (and every normal block when rows=1): one generator per block, seeded
    # from its key, fills the block's rows one after another in place (each row of a block is
    # contiguous), so no per-block array is made and concatenated, which cost a noticeable share
    # of a forward step. Other blocks are kind(keys[j], (rows, sizes[j])) copied in (a call per
    # row costs more than the copy of a small block; signs are cheap).
    sizes = check_draw_rows(kind, keys, sizes)
    dtype, rows = as_dtype(dtype), int(rows)
    out = torch.empty((rows, sum(sizes)), dtype=dtype, device=device)
    start = 0
    for k, size in zip(keys, sizes):
        if kind == "normal" and (rows == 1 or size >= _ROW_FILL_MIN):
            g = _generator(k, out.device)
            for r in range(rows):
                out[r, start : start + size].normal_(generator=g)
        else:  # small blocks: one draw and a copy cost less than a call per row
            draw = normal if kind == "normal" else rademacher
            out[:, start : start + size].copy_(draw(k, (rows, size), dtype=dtype, device=out.device))
        start += size
    return out


def uniform(key, shape, dtype="float32", minval=0.0, maxval=1.0, device=None):
    u = torch.rand(tuple(shape), generator=_generator(key, device), dtype=as_dtype(dtype), device=device)
    return u * (maxval - minval) + minval


def bernoulli(key, p, shape, device=None):
    return torch.rand(tuple(shape), generator=_generator(key, device), device=device) < p
