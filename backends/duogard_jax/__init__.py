"""The JAX backend of duogard.

Same public names as ``duogard_torch`` (a test checks it). The public functions in the
front end carry the docstrings; these stay short, with a comment where JAX and PyTorch
differ.
"""

from __future__ import annotations

import os

try:
    if os.environ.get("DUOGARD_SHARED_GPU", "1") != "0":
        # Two frameworks on one GPU: JAX must not grab 75% of device memory at import.
        # Only a default: a value the user set is kept.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "duogard's jax backend needs JAX: pip install \"duogard[jax]\" (or pip install jax)"
    ) from exc

import numpy as np

from duogard.tree import tree_flatten, tree_leaves, tree_map, tree_structure, tree_unflatten

name = "jax"
framework = "jax"
install_hint = 'pip install "duogard[jax]"'
#: use duogard's hand-written forward rules for its own layers where they apply?
fast_jvp_rules = False  # jax.jvp through XLA is as fast as hand-written rules
xp = jnp

float32 = jnp.float32
float64 = jnp.float64
int32 = jnp.int32
int64 = jnp.int64


def framework_version() -> str:
    return jax.__version__


# ----------------------------------------------------------------------------- arrays

def is_array(x) -> bool:
    return isinstance(x, (jax.Array, jax.core.Tracer))


def as_dtype(dtype):
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = {"bfloat16": jnp.bfloat16}.get(dtype, dtype)
    return jnp.dtype(dtype)


def dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def default_device():
    return jax.devices()[0]


def _resolve_device(device):
    if device is None or not isinstance(device, str):
        return device
    kind, _, index = device.partition(":")
    kind = {"cuda": "gpu"}.get(kind, kind)
    return jax.devices(kind)[int(index or 0)]


def device_of(x):
    if isinstance(x, jax.core.Tracer):
        return None  # placement is decided by the jit/vmap around a tracer
    return next(iter(x.devices()))


def device_kind(x) -> str:
    # "cpu" or "cuda", the same words on both backends
    platform = device_of(x).platform
    return "cuda" if platform == "gpu" else platform


def asarray(x, dtype=None, device=None):
    dtype = as_dtype(dtype)
    if type(x).__module__.startswith("torch"):
        from duogard.interop import convert  # DLPack, zero-copy where possible

        # asking for a narrower dtype is an explicit downcast: let convert allow it
        x = convert(x, to="jax", allow_downcast=dtype is not None and dtype.itemsize < 8)
    if dtype is not None and dtype.itemsize == 8 and not jax.config.jax_enable_x64:
        raise TypeError(
            f"asarray: dtype {dtype.name} needs JAX 64-bit mode "
            "(jax.config.update('jax_enable_x64', True)); JAX would silently use 32 bits"
        )
    out = jnp.asarray(x, dtype=dtype)
    if device is not None:
        out = jax.device_put(out, _resolve_device(device))
    return out


def to_numpy(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


# ----------------------------------------------------------------------------- nn ops

def linear(x, w, b=None):
    y = jnp.matmul(x, jnp.matrix_transpose(w))
    return y if b is None else y + b


def conv2d(x, w, b=None, *, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1):
    y = jax.lax.conv_general_dilated(
        x, w, window_strides=tuple(stride), padding=tuple(tuple(p) for p in padding),
        rhs_dilation=tuple(dilation), dimension_numbers=("NCHW", "OIHW", "NCHW"),
        feature_group_count=groups,
    )
    return y if b is None else y + jnp.reshape(b, (1, -1, 1, 1))


def conv2d_weight_grad(x, gz, w_shape, *, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1):
    """The gradient of ``sum(gz * conv2d(x, w))`` in ``w`` (shape ``w_shape``). The transpose of the
    convolution in ``w``; under jit XLA drops the unused forward convolution of the vjp."""
    w0 = jnp.zeros(tuple(w_shape), dtype=gz.dtype)
    _, pullback = jax.vjp(lambda w: conv2d(x, w, stride=stride, padding=padding, dilation=dilation,
                                           groups=groups), w0)
    return pullback(gz)[0]


def max_pool2d(x, *, kernel_size, stride, padding=(0, 0)):
    pads = ((0, 0), (0, 0), (padding[0], padding[0]), (padding[1], padding[1]))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 1, *kernel_size), (1, 1, *stride), pads
    )


def avg_pool2d(x, *, kernel_size, stride, padding=(0, 0), count_include_pad=True):
    pads = ((0, 0), (0, 0), (padding[0], padding[0]), (padding[1], padding[1]))
    window, strides = (1, 1, *kernel_size), (1, 1, *stride)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads)
    if count_include_pad:
        return total / (kernel_size[0] * kernel_size[1])
    ones = jnp.ones((1, 1, *x.shape[2:]), x.dtype)
    counts = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pads)
    return total / counts


def relu(x):
    return jax.nn.relu(x)


def leaky_relu(x, negative_slope=0.01):
    # not jax.nn.leaky_relu: its slope at x = 0 is 1, torch's is negative_slope
    return jnp.where(x > 0, x, negative_slope * x)


def gelu(x, approximate=False):
    # jax.nn.gelu defaults to the tanh approximation; torch to the exact erf form
    return jax.nn.gelu(x, approximate=approximate)


def sigmoid(x):
    return jax.nn.sigmoid(x)


def softplus(x, beta=1.0, threshold=20.0):
    # torch's rule: linear above threshold
    bx = beta * x
    return jnp.where(bx > threshold, x, jax.nn.softplus(bx) / beta)


def elu(x, alpha=1.0):
    return jax.nn.elu(x, alpha)


def silu(x):
    return jax.nn.silu(x)


def tanh(x):
    return jnp.tanh(x)


def softmax(x, axis=-1):
    return jax.nn.softmax(x, axis=axis)


def log_softmax(x, axis=-1):
    return jax.nn.log_softmax(x, axis=axis)


def logsumexp(x, axis=None, keepdims=False):
    return jax.nn.logsumexp(x, axis=axis, keepdims=keepdims)


def layer_norm(x, weight, bias, *, normalized_ndim, eps=1e-5):
    axes = tuple(range(x.ndim - normalized_ndim, x.ndim))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


# ----------------------------------------------------------------------------- autodiff

def jvp(f, primals, tangents, has_aux=False):
    return jax.jvp(f, tuple(primals), tuple(tangents), has_aux=has_aux)


def vjp(f, *primals):
    return jax.vjp(f, *primals)


def value_and_grad(f, argnums=0, has_aux=False):
    return jax.value_and_grad(f, argnums=argnums, has_aux=has_aux)


def grad(f, argnums=0, has_aux=False):
    return jax.grad(f, argnums=argnums, has_aux=has_aux)


def vmap(f, in_axes=0, out_axes=0):
    return jax.vmap(f, in_axes=in_axes, out_axes=out_axes)


def jit(f, *, static_argnums=None, static_argnames=None, donate_argnums=None, compile=True):
    if not compile:
        return f
    return jax.jit(f, static_argnums=static_argnums, static_argnames=static_argnames,
                   donate_argnums=donate_argnums)


def stop_gradient(x):
    return jax.lax.stop_gradient(x)


def is_tracing(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def synchronize(tree=None):
    if tree is not None:
        jax.block_until_ready(tree)
    return tree


def add_scaled_(target, value, scale, where=None):
    # arrays are immutable: a new array (in place when jitted with ``target`` donated)
    out = (target + jnp.asarray(scale, target.dtype) * value).astype(target.dtype)
    return out if where is None else jnp.where(where, out, target)


# ----------------------------------------------------------------------------- random

def key(seed: int):
    return jax.random.PRNGKey(int(seed))


def split(key, num: int = 2):
    return jax.random.split(key, num)


def fold_in(key, data: int):
    return jax.random.fold_in(key, data)


def key_data(key) -> np.ndarray:
    return np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                      else key, dtype=np.uint32)


def key_from_data(data):
    return jnp.asarray(np.asarray(data, dtype=np.uint32))


def _placed(x, device):
    return x if device is None else jax.device_put(x, _resolve_device(device))


def _draw_shape(shape):
    """A 2-D shape with ``prod(shape)`` numbers and a long leading axis, to draw in.

    threefry numbers the draws by their flat (row-major) index, so a draw in any shape of the
    same size holds the same numbers in the same order (a test checks it). XLA's CPU code for
    shapes like (1, n) or (n,) was about 30% slower than for (n / 1024, 1024): the MLP's
    1.86M normal tangents took 20 ms against 14 ms, and the forward step 1.22x the
    hand-written one that draws each leaf in its own shape (benchmarks/RESULTS.md)."""
    n = int(np.prod(shape, dtype=np.int64))
    for c in (1024, 512, 256, 128, 64, 32, 16, 8):
        if n % c == 0 and n // c >= 8:
            return (n // c, c)
    return tuple(shape)


def normal(key, shape, dtype=jnp.float32, device=None):
    shape = tuple(int(d) for d in shape)
    v = jax.random.normal(key, _draw_shape(shape), dtype=as_dtype(dtype))
    return _placed(jnp.reshape(v, shape), device)


def rademacher(key, shape, dtype=jnp.float32, device=None):
    # 32 signs from each 32-bit word. The words come from a counter hash (two rounds of a
    # bijective 32-bit mixer over the word index, seeded with 64 threefry bits of ``key``):
    # threefry for every word cost 1.1 of the 1.4 ms for 1.86M signs, the hash 0.17 ms
    shape = tuple(shape)
    n = int(np.prod(shape))
    seed = jax.random.bits(key, (2,), jnp.uint32)
    index = jnp.arange((n + 31) // 32, dtype=jnp.uint32)
    words = _mix32(_mix32(index * jnp.uint32(0x9E3779B9) + seed[0]) ^ seed[1])
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    signs = bits.reshape(-1)[:n].astype(as_dtype(dtype)) * 2 - 1
    return _placed(signs.reshape(shape), device)


def draw_rows(kind, keys, sizes, rows, dtype=jnp.float32, device=None):
    """A ``(rows, sum(sizes))`` array; block j (its columns) is ``kind(keys[j], (rows, sizes[j]))``.
    (XLA writes the draws straight into the concatenation under jit.)"""
    if kind not in ("normal", "rademacher"):
        raise ValueError(f"draw_rows: kind must be 'normal' or 'rademacher', got {kind!r}")
    sizes = [int(s) for s in sizes]
    if len(keys) != len(sizes):
        raise ValueError(f"draw_rows: one key per block: got {len(keys)} keys for {len(sizes)} sizes")
    draw = normal if kind == "normal" else rademacher
    blocks = [draw(k, (int(rows), s), dtype=dtype) for k, s in zip(keys, sizes)]
    return _placed(jnp.concatenate(blocks, axis=1), device)


def _mix32(x):
    # a bijective avalanche mixer on uint32 (xor-shift / multiply, "lowbias32" constants)
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def uniform(key, shape, dtype=jnp.float32, minval=0.0, maxval=1.0, device=None):
    u = jax.random.uniform(key, tuple(shape), dtype=as_dtype(dtype), minval=minval,
                           maxval=maxval)
    return _placed(u, device)


def bernoulli(key, p, shape, device=None):
    return _placed(jax.random.bernoulli(key, p, tuple(shape)), device)
