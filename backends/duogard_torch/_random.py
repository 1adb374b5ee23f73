"""Explicit-key randomness on PyTorch.

A key is a CPU int64 tensor of two 32-bit words. ``key``, ``split`` and ``fold_in`` and the
default (``"portable"``) draws are duogard's Philox-4x32-10 generator
(:mod:`duogard.backend._philox`, the specification): keys are derived on the host, draws run as
int64 tensor ops on the arrays' device, and give the same numbers as every other backend.
On a CPU, draws of under a million numbers run on the host in one call of duogard's compiled
Philox kernel (:mod:`duogard.backend._philox_host`; where it is not built, draws of up to
16,384 words run the NumPy specification there instead); onto an accelerator, small draws run
on the host and are copied over once. Large normal and sign draws (float32 and below) on a CPU
run kernels compiled by ``torch.compile`` (the rounds fused with Box-Muller or the bit
unpacking: eager int64 ops cost 3-7x ``torch.randn``), compiled on the first such draw of a
process and cached on disk by inductor; ``DUOGARD_COMPILE_DRAWS=0`` keeps them off the
compiler (then the host kernel, else eager ops, draws them).
``generator="native"`` draws with a ``torch.Generator`` seeded from a splitmix64 hash of the key.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from duogard.backend import _philox as spec
from duogard.backend import _philox_host as host
from duogard.backend.authoring import check_draw_rows, check_generator

from ._arrays import as_dtype

_MASK64 = (1 << 64) - 1
_MASK32 = 0xFFFFFFFF


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _words_of(key) -> tuple[int, int]:
    hi, lo = (int(v) & _MASK32 for v in key.tolist())
    return hi, lo


def _make_key(words):
    return torch.tensor([int(w) for w in words], dtype=torch.int64)


# key arithmetic runs on the host with Python ints: torch.compile must not trace it (it would
# turn the ints into symbols that Generator.manual_seed refuses); it runs eagerly in a graph break
@torch.compiler.disable
def _generator(key, device):
    device = torch.device("cpu") if device is None else torch.device(device)
    hi, lo = _words_of(key)
    g = torch.Generator(device=device)
    g.manual_seed(_splitmix64((hi << 32) | lo) & 0x7FFFFFFFFFFFFFFF)
    return g


def key(seed: int):
    return _make_key(spec.key_words(seed))


@torch.compiler.disable
def split(key, num: int = 2):
    return torch.as_tensor(spec.split_words(_words_of(key), num).astype(np.int64))


@torch.compiler.disable
def fold_in(key, data: int):
    return _make_key(spec.fold_in_words(_words_of(key), int(data)))


@torch.compiler.disable
def fold_in_many(key, data):
    return torch.from_numpy(host.fold_in_many(_words_of(key), data))


def key_data(key) -> np.ndarray:
    return key.numpy().astype(np.uint32)


def key_from_data(data):
    return torch.as_tensor(np.asarray(data, dtype=np.uint32).astype(np.int64))


_CHUNK = 1 << 15  # counters per chunk: the rounds of one chunk stay in the CPU's cache
_HOST_WORDS = 1 << 14  # draws of up to this many words run on the host (~100 tiny torch ops cost more)


def _philox_blocks(c0, k0: int, k1: int):
    """Philox-4x32-10 of the counters ``(c0, 0, 0, 0)`` under the key ``(k0, k1)``.

    uint32 words are held in int64: a product of two words is below 2**64 and int64 arithmetic
    keeps its low 64 bits, so ``(p >> 32) & mask`` and ``p & mask`` are its high and low words.
    The first two rounds are written out, since three of the four counter words start as
    constants (Python ints): fewer whole-array passes.
    """
    m0, m1 = spec.PHILOX_M
    w0, w1 = spec.PHILOX_W
    mask = _MASK32
    # round 1: (c0, 0, 0, 0) -> (k0, 0, hi(c0 m0) ^ k1, lo(c0 m0)); c0 and c1 now constants
    p0 = c0 * m0
    c2 = (p0 >> 32).bitwise_and_(mask).bitwise_xor_(k1)
    c3 = p0.bitwise_and_(mask)
    a0, a1 = k0, 0
    k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
    # round 2: the constant c0 gives constant words of its product
    q0 = a0 * m0
    p1 = c2 * m1
    c0 = (p1 >> 32).bitwise_and_(mask).bitwise_xor_(a1 ^ k0)
    c1 = p1.bitwise_and_(mask)
    c2 = c3.bitwise_xor_(((q0 >> 32) & mask) ^ k1)
    c3 = torch.full_like(c0, q0 & mask)
    k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
    for _ in range(spec.ROUNDS - 2):
        p0, p1 = c0 * m0, c2 * m1
        n0 = (p1 >> 32).bitwise_and_(mask).bitwise_xor_(c1).bitwise_xor_(k0)
        n2 = (p0 >> 32).bitwise_and_(mask).bitwise_xor_(c3).bitwise_xor_(k1)
        c0, c1, c2, c3 = n0, p1.bitwise_and_(mask), n2, p0.bitwise_and_(mask)
        k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
    return c0, c1, c2, c3


@torch.compiler.disable
def _words(key, n: int, device):
    """The first ``n`` words of ``key``'s stream (the spec's ``words``), as int64, a chunk of
    counters at a time.
    """
    k0, k1 = _words_of(key)
    if n <= _host_limit(device):  # a small draw (a rank-1 factor, a bias): on the host, one copy over
        return torch.from_numpy(host.words((k0, k1), n).astype(np.int64)).to(device)
    blocks = -(-n // 4)
    out = torch.empty((blocks, 4), dtype=torch.int64, device=device)
    for start in range(0, blocks, _CHUNK):
        stop = min(blocks, start + _CHUNK)
        lanes = _philox_blocks(torch.arange(start, stop, dtype=torch.int64, device=out.device), k0, k1)
        out[start:stop] = torch.stack(lanes, dim=1)
    return out.reshape(-1)[:n]


def _unit(w, dtype):
    return ((w >> 9).to(dtype) * 2 + 1) * 2.0**-24


# numbers from which a CPU normal or sign draw (float32, float16 or bfloat16) runs a compiled
# kernel: its compilation (seconds, once a process) pays for itself only over many such draws.
# float64 draws stay eager: tests draw their statistics in float64, and must not compile
_COMPILE_MIN = 1 << 20
_KERNELS: dict = {}  # (kind, working dtype) -> its compiled kernel (None: compiling failed)
_TWO_PI = {torch.float32: float(np.float32(2 * np.pi)), torch.float64: 2 * np.pi}


def _rounds(blocks: int, schedule):
    """The four words of the blocks ``0 .. blocks - 1`` (counters ``(i, 0, 0, 0)``), in int64,
    written for ``torch.compile``, which fuses the rounds into one loop over the blocks where
    eager ops make ~100 passes over memory. ``schedule`` holds every round's key (a tensor:
    one compiled kernel serves every key).

    As in :func:`_philox_blocks`, a product of two words is exact in int64's low 64 bits; here
    a product's high word (``>>`` is arithmetic) is masked once, after its XORs, and the low
    words, which only enter those XORs, are masked at the end.
    """
    m0, m1 = spec.PHILOX_M
    c0 = torch.arange(blocks, dtype=torch.int64)
    c1 = c2 = c3 = torch.zeros((), dtype=torch.int64)
    for r in range(spec.ROUNDS):
        p0, p1 = c0 * m0, c2 * m1
        c0 = ((p1 >> 32) ^ c1 ^ schedule[r, 0]) & _MASK32
        c2 = ((p0 >> 32) ^ c3 ^ schedule[r, 1]) & _MASK32
        c1, c3 = p1, p0
    return c0, c1 & _MASK32, c2, c3 & _MASK32


def _normal_kernel(blocks: int, schedule, dtype):
    """Normal numbers ``0 .. 4 blocks - 1`` of a stream, computed in ``dtype``: the spec's
    Box-Muller of each block's four words, fused with the rounds.
    """
    c0, c1, c2, c3 = _rounds(blocks, schedule)
    r0, r1 = (torch.sqrt(torch.log(_unit(c, dtype)) * -2) for c in (c0, c2))
    t0, t1 = (_unit(c, dtype) * _TWO_PI[dtype] for c in (c1, c3))
    pairs = [r0 * torch.cos(t0), r0 * torch.sin(t0), r1 * torch.cos(t1), r1 * torch.sin(t1)]
    return torch.stack(pairs, dim=1).reshape(-1)


def _signs_kernel(blocks: int, schedule, dtype):
    """Signs ``0 .. 128 blocks - 1`` of a stream in ``dtype``: sign ``j`` from bit ``j % 32`` of
    word ``j // 32``, fused with the rounds.
    """
    words = torch.stack(_rounds(blocks, schedule), dim=1).reshape(-1, 1)
    bits = (words >> torch.arange(32, dtype=torch.int64)) & 1
    return (bits * 2 - 1).to(dtype).reshape(-1)


_KERNEL_OF = {"normal": (_normal_kernel, 4), "signs": (_signs_kernel, 128)}  # and numbers per block


@torch.compiler.disable
def _compiled(kind: str, key, n: int, dtype):
    """``n`` portable numbers of ``kind`` (``"normal"`` or ``"signs"``) by a compiled kernel
    (CPU), or None where compiled draws are switched off (``DUOGARD_COMPILE_DRAWS=0``), under a
    ``torch.func`` transform, or the kernel could not be compiled (then once a warning).

    A kernel is compiled on the first large draw of its kind and working dtype, with dynamic
    shapes: one compilation serves every size, and inductor caches it on disk for later
    processes. Keys and sizes are arguments, so nothing recompiles.
    """
    if os.environ.get("DUOGARD_COMPILE_DRAWS", "1") == "0":
        return None
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return None  # under torch.func.vmap / jvp / grad, which a compiled function refuses
    if _get_current_dispatch_mode() is not None:
        # under a dispatch mode (step memory's storage tracker), which torch.compile refuses: a
        # failed compilation here would switch compiled draws off for the process
        return None
    work = _working(dtype)
    body, per_block = _KERNEL_OF[kind]
    if (kind, work) not in _KERNELS:
        _KERNELS[kind, work] = torch.compile(
            lambda blocks, schedule: body(blocks, schedule, work), dynamic=True, fullgraph=True
        )
    kernel = _KERNELS[kind, work]
    if kernel is None:
        return None
    k0, k1 = _words_of(key)
    w0, w1 = spec.PHILOX_W
    schedule = torch.tensor(
        [[(k0 + r * w0) & _MASK32, (k1 + r * w1) & _MASK32] for r in range(spec.ROUNDS)], dtype=torch.int64
    )
    try:
        with torch.no_grad():  # one guard state: no recompilation under another grad mode
            out = kernel(-(-n // per_block), schedule)
    except Exception as e:  # no C++ compiler, an unsupported platform ...: draw eagerly
        _KERNELS[kind, work] = None
        warnings.warn(
            f"duogard: torch.compile of the portable {kind} draw failed ({type(e).__name__}: {e}); "
            "large draws run eagerly (DUOGARD_COMPILE_DRAWS=0 skips the attempt)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return out[:n].to(dtype)


def _compiles(n: int, dtype, device) -> bool:
    """Whether a draw of ``n`` numbers in ``dtype`` onto ``device`` tries a compiled kernel:
    large, computed in float32, on CPU.
    """
    return n >= _COMPILE_MIN and dtype != torch.float64 and torch.device(device or "cpu").type == "cpu"


def _working(dtype):
    """The dtype a draw in ``dtype`` computes in (the spec's ``working_dtype``): float16 and
    bfloat16 draws are float32 ones rounded (their own arithmetic overflows or rounds to 1).
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _host_dtype(dtype):
    return np.float64 if dtype == torch.float64 else np.float32


def _uniform_of(w, dtype):
    """The uniform numbers of words ``w`` in ``dtype``: rounded from the working precision and,
    in float16 or bfloat16, capped below 1.
    """
    u = _unit(w, _working(dtype)).to(dtype)
    if dtype.itemsize >= 4:
        return u
    return u.clamp_(max=spec.below_one(str(dtype).removeprefix("torch.")))


def _host_limit(device) -> int:
    """The largest draw (in numbers or words) that runs on the host: below the compiled
    kernels' size on a CPU where the host kernel is built (it is faster than eager torch ops
    there), a few thousand otherwise (the copy to an accelerator, or NumPy's rounds, cost more
    for larger draws than the device's own ops).
    """
    return _COMPILE_MIN - 1 if _host_kernel_on(device) else _HOST_WORDS


def _host_kernel_on(device) -> bool:
    """Whether draws onto ``device`` may run on the host kernel: a CPU, with the kernel built."""
    return torch.device(device or "cpu").type == "cpu" and host.kernel() is not None


def _on_host(kind: str, key, n: int, dtype, device):
    """``n`` numbers of ``kind`` drawn on the host (the kernel, else the NumPy specification)
    and copied over once: the same numbers (normal ones to float rounding).
    """
    return _host_draw(kind, [_words_of(key)], [n], dtype).to(device=device, dtype=dtype)


def _host_draw(kind: str, words, counts, dtype):
    """The host kernel's numbers (:func:`duogard.backend._philox_host.draw_many`) as a CPU tensor
    of the host dtype: written into a tensor torch allocated, so that its allocation is seen
    where torch's are (the step memory tracker counts the tangents); under a torch.func
    transform, whose tensors have no NumPy view, through a NumPy array.
    """
    hd = _host_dtype(dtype)
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return torch.from_numpy(host.draw_many(kind, words, counts, hd))
    buf = torch.empty(int(sum(counts)), dtype=torch.float64 if hd == np.float64 else torch.float32)
    host.draw_many(kind, words, counts, hd, out=buf.numpy())
    return buf


def _portable_normal(key, n: int, dtype, device):
    if n <= _host_limit(device):
        # a small draw: the whole Box-Muller on the host, one copy over (the ~10 torch ops it
        # takes cost more); the same formula, equal to float rounding
        return _on_host("normal", key, n, dtype, device)
    if _compiles(n, dtype, device):
        out = _compiled("normal", key, n, dtype)
        if out is not None:
            return out
    if _host_kernel_on(device):  # no compiled kernel: the host kernel beats eager int64 ops
        return _on_host("normal", key, n, dtype, device)
    pairs = -(-n // 2)
    work = _working(dtype)
    u = _unit(_words(key, 2 * pairs, device), work).reshape(pairs, 2)
    r = torch.sqrt(torch.log(u[:, 0]) * -2)
    t = u[:, 1] * torch.tensor(2 * np.pi, dtype=work)
    return torch.stack([r * torch.cos(t), r * torch.sin(t)], dim=1).reshape(-1)[:n].to(dtype)


def _portable_signs(key, n: int, dtype, device):
    # sign j is bit j % 32 of word j // 32: the words as int32 are four little-endian bytes,
    # byte b holds bits 8b..8b+7, unpacked eight at a time through the (256, 8) sign table
    if n <= _host_limit(device) and host.kernel() is not None:
        return _on_host("rademacher", key, n, dtype, device)
    if _compiles(n, dtype, device):
        out = _compiled("signs", key, n, dtype)
        if out is not None:
            return out
    if _host_kernel_on(device):
        return _on_host("rademacher", key, n, dtype, device)
    w = _words(key, -(-n // 32), device).to(torch.int32)
    table = _sign_table(dtype, w.device)
    return torch.index_select(table, 0, w.view(torch.uint8).long()).reshape(-1)[:n]


def normal(key, shape, dtype="float32", device=None, generator="portable"):
    shape, dtype = tuple(int(d) for d in shape), as_dtype(dtype)
    if check_generator(generator) == "native":
        return torch.randn(shape, generator=_generator(key, device), dtype=dtype, device=device)
    return _portable_normal(key, math.prod(shape), dtype, device).reshape(shape)


def rademacher(key, shape, dtype="float32", device=None, generator="portable"):
    shape, dtype = tuple(int(d) for d in shape), as_dtype(dtype)
    if check_generator(generator) == "portable":
        return _portable_signs(key, math.prod(shape), dtype, device).reshape(shape)
    # native: 64 signs from each random int64 word, unpacked byte by byte through a (256, 8)
    # table of signs: much faster than a draw per element
    n = math.prod(shape)
    words = torch.randint(
        -(2**63),
        2**63 - 1,
        ((n + 63) // 64,),
        generator=_generator(key, device),
        dtype=torch.int64,
        device=device,
    )
    table = _sign_table(dtype, words.device)
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


_ROW_FILL_MIN = 1 << 16  # numbers per row from which draw_rows fills a native normal block row by row


@torch.compiler.disable
def draw_rows(kind, keys, sizes, rows, dtype="float32", device=None, generator="portable"):
    # Block j is kind(keys[j], (rows, sizes[j])) copied into its columns. Native normal blocks
    # that are large (or all of them when rows=1) are filled row by row in place from one
    # generator per block instead (each row of a block is contiguous): no per-block array.
    # Portable blocks of up to _HOST_WORDS numbers are drawn together on the host, in one
    # vectorised NumPy pass (the spec's draw_many), and copied over once: a model's small
    # leaves (biases, rank-1 factors) each cost more in per-draw overhead than in numbers.
    sizes = check_draw_rows(kind, keys, sizes)
    native = check_generator(generator) == "native"
    dtype, rows = as_dtype(dtype), int(rows)
    limit = _host_limit(device)
    small = [j for j, s in enumerate(sizes) if not native and rows * s <= limit]
    if len(sizes) == 1 and not small and not (native and kind == "normal"):
        draw = normal if kind == "normal" else rademacher  # one block: no copy into a new array
        return draw(keys[0], (rows, sizes[0]), dtype=dtype, device=device, generator=generator)
    counts = [rows * sizes[j] for j in small]
    if small:
        words = np.stack([np.asarray(_words_of(keys[j]), dtype=np.uint32) for j in small])
        flat = _host_draw(kind, words, counts, dtype).to(device, dtype)
        if len(sizes) == 1 or (rows == 1 and len(small) == len(sizes)):
            return flat.reshape(rows, -1)  # one row of blocks side by side: the concatenation
    out = torch.empty((rows, sum(sizes)), dtype=dtype, device=device)
    starts = [int(a) for a in np.cumsum(sizes) - np.asarray(sizes, dtype=np.int64)]
    for j, at, n in zip(small, np.cumsum(counts) - counts, counts):
        out[:, starts[j] : starts[j] + sizes[j]].copy_(flat[at : at + n].reshape(rows, sizes[j]))
    for j in sorted(set(range(len(sizes))) - set(small)):
        k, size, start = keys[j], sizes[j], starts[j]
        if native and kind == "normal" and (rows == 1 or size >= _ROW_FILL_MIN):
            g = _generator(k, out.device)
            for r in range(rows):
                out[r, start : start + size].normal_(generator=g)
        else:
            draw = normal if kind == "normal" else rademacher
            block = draw(k, (rows, size), dtype=dtype, device=out.device, generator=generator)
            out[:, start : start + size].copy_(block)
    return out


def uniform(key, shape, dtype="float32", minval=0.0, maxval=1.0, device=None, generator="portable"):
    shape, dtype = tuple(int(d) for d in shape), as_dtype(dtype)
    if check_generator(generator) == "native":
        u = torch.rand(shape, generator=_generator(key, device), dtype=dtype, device=device)
    else:
        u = _uniform_of(_words(key, math.prod(shape), device), dtype).reshape(shape)
    return u * (maxval - minval) + minval


def bernoulli(key, p, shape, device=None, generator="portable"):
    return uniform(key, shape, device=device, generator=generator) < p
