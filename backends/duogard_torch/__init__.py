"""The PyTorch backend of duogard.

Same public names as ``duogard_jax`` (a test checks it). Autodiff goes through
``torch.func`` with JAX's signatures; randomness takes explicit keys (a key is a CPU
int64 tensor of two 32-bit words, hashed into a fresh ``torch.Generator`` seed per draw).
"""

from __future__ import annotations

try:
    import torch
    import torch.func
    import torch.nn.functional as F
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "duogard's torch backend needs PyTorch: pip install torch==2.13.0 (CPU wheel), then "
        "pip install \"duogard[torch]\""
    ) from exc
try:
    import array_api_compat.torch as _xp
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "duogard's torch backend needs array-api-compat: pip install \"duogard[torch]\""
    ) from exc

import numpy as np

from duogard.tree import tree_flatten, tree_leaves, tree_map, tree_structure, tree_unflatten

name = "torch"
framework = "torch"
install_hint = 'pip install torch==2.13.0 "duogard[torch]"'
#: use duogard's hand-written forward rules for its own layers where they apply?
fast_jvp_rules = True  # torch.func.jvp pays for dual tensors op by op; duogard's own rules are faster
xp = _xp

float32 = torch.float32
float64 = torch.float64
int32 = torch.int32
int64 = torch.int64

_DTYPES = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
    "float64": torch.float64, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool,
    "complex64": torch.complex64, "complex128": torch.complex128,
}


def framework_version() -> str:
    return torch.__version__


# ----------------------------------------------------------------------------- arrays

def is_array(x) -> bool:
    return isinstance(x, torch.Tensor)


def as_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    try:
        return _DTYPES[key]
    except KeyError:
        raise TypeError(f"as_dtype: unsupported dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def dtype_name(dtype) -> str:
    return str(as_dtype(dtype)).removeprefix("torch.")


def default_device():
    return torch.device("cpu")


def device_of(x):
    return x.device


def device_kind(x) -> str:
    return x.device.type


def asarray(x, dtype=None, device=None):
    dtype = as_dtype(dtype)
    if type(x).__module__.startswith(("jax", "jaxlib")):
        from duogard.interop import convert  # DLPack, zero-copy where possible

        x = convert(x, to="torch")
    elif isinstance(x, np.ndarray) and not x.flags.writeable:
        x = x.copy()  # torch refuses to wrap read-only NumPy memory
    return torch.as_tensor(x, dtype=dtype, device=device)


def to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy()


# ----------------------------------------------------------------------------- nn ops

def linear(x, w, b=None):
    # one fused addmm (and its fused forward and backward rules): x @ w.T + b as two ops were part
    # of why forward-activity's MLP JVP was slower than the hand-written one (benchmarks/RESULTS.md)
    if x.dtype != w.dtype or (b is not None and b.dtype != w.dtype):
        # F.linear does not promote; the array API's matmul (and JAX) do: float32 data with
        # float64 params computes in float64
        dt = torch.promote_types(x.dtype, w.dtype) if b is None else \
            torch.promote_types(torch.promote_types(x.dtype, w.dtype), b.dtype)
        x, w, b = x.to(dt), w.to(dt), None if b is None else b.to(dt)
    return F.linear(x, w, b)


def conv2d(x, w, b=None, *, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1):
    # the bias inside the convolution: a separate broadcast add is one more pass over the
    # output (and, under forward AD, over its tangent), as matmul + add was for linear
    late = b is not None and b.dtype != w.dtype  # F.conv2d does not promote; the add does
    fused = None if late else b
    (pt, pb), (pl, pr) = padding
    if pt == pb and pl == pr:
        y = F.conv2d(x, w, fused, tuple(stride), (pt, pl), tuple(dilation), groups)
    else:
        # torch's conv takes symmetric padding only; pad asymmetric cases ("same", even kernel)
        y = F.conv2d(F.pad(x, (pl, pr, pt, pb)), w, fused, tuple(stride), 0, tuple(dilation), groups)
    return y + b.reshape(1, -1, 1, 1) if late else y


def conv2d_weight_grad(x, gz, w_shape, *, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1):
    """The gradient of ``sum(gz * conv2d(x, w))`` in ``w`` (shape ``w_shape``), without the forward
    convolution that ``vjp`` would run first (it cost the forward-activity CNN step a quarter)."""
    (pt, pb), (pl, pr) = padding
    if not (pt == pb and pl == pr):
        x, (pt, pl) = F.pad(x, (pl, pr, pt, pb)), (0, 0)
    return torch.nn.grad.conv2d_weight(x, tuple(w_shape), gz, tuple(stride), (pt, pl), tuple(dilation), groups)


def max_pool2d(x, *, kernel_size, stride, padding=(0, 0)):
    return F.max_pool2d(x, tuple(kernel_size), tuple(stride), tuple(padding))


def avg_pool2d(x, *, kernel_size, stride, padding=(0, 0), count_include_pad=True):
    return F.avg_pool2d(x, tuple(kernel_size), tuple(stride), tuple(padding),
                        count_include_pad=count_include_pad)


def relu(x):
    return torch.relu(x)


def leaky_relu(x, negative_slope=0.01):
    return F.leaky_relu(x, negative_slope)


def gelu(x, approximate=False):
    return F.gelu(x, approximate="tanh" if approximate else "none")


def sigmoid(x):
    return torch.sigmoid(x)


def softplus(x, beta=1.0, threshold=20.0):
    return F.softplus(x, beta, threshold)


def elu(x, alpha=1.0):
    return F.elu(x, alpha)


def silu(x):
    return F.silu(x)


def tanh(x):
    return torch.tanh(x)


def softmax(x, axis=-1):
    return torch.softmax(x, dim=axis)


def log_softmax(x, axis=-1):
    return torch.log_softmax(x, dim=axis)


def logsumexp(x, axis=None, keepdims=False):
    if axis is None:
        return torch.logsumexp(x.reshape(-1), dim=0)
    return torch.logsumexp(x, dim=axis, keepdim=keepdims)


def layer_norm(x, weight, bias, *, normalized_ndim, eps=1e-5):
    return F.layer_norm(x, tuple(x.shape[x.ndim - normalized_ndim:]), weight, bias, eps)


# ----------------------------------------------------------------------------- autodiff

def jvp(f, primals, tangents, has_aux=False):
    return torch.func.jvp(f, tuple(primals), tuple(tangents), has_aux=has_aux)


def vjp(f, *primals):
    return torch.func.vjp(f, *primals)


def value_and_grad(f, argnums=0, has_aux=False):
    # torch.func returns (grad, value) / (grad, (value, aux)); JAX's order is (value, grad)
    gv = torch.func.grad_and_value(f, argnums=argnums, has_aux=has_aux)

    def wrapped(*args, **kwargs):
        if _plain_autograd_ok(args, argnums):
            return _autograd_value_and_grad(f, argnums, has_aux, args, kwargs)
        g, v = gv(*args, **kwargs)
        return v, g

    return wrapped


def _plain_autograd_ok(args, argnums) -> bool:
    # torch.autograd is ~35% faster than torch.func for a whole training step (benchmarks/), but
    # only where it cannot change the numbers: not under a torch.func transform or torch.compile,
    # and not when the inputs already belong to an autograd graph (a nested derivative)
    if not isinstance(argnums, int) or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    if torch.compiler.is_compiling():
        return False
    leaves = tree_leaves(args[argnums])
    return bool(leaves) and all(isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad
                                for x in leaves)


def _autograd_value_and_grad(f, argnums, has_aux, args, kwargs):
    leaves, treedef = tree_flatten(args[argnums])
    inputs = [x.detach().requires_grad_(True) for x in leaves]
    args = (*args[:argnums], tree_unflatten(treedef, inputs), *args[argnums + 1:])
    with torch.enable_grad():
        out = f(*args, **kwargs)
        value, aux = out if has_aux else (out, None)
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            raise RuntimeError(f"value_and_grad: the function must return a scalar tensor, got "
                               f"{type(value).__name__} of shape {tuple(getattr(value, 'shape', ()))}")
        if value.requires_grad:
            grads = torch.autograd.grad(value, inputs, allow_unused=True)
        else:  # the output does not depend on the inputs
            grads = [None] * len(inputs)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    value = value.detach()
    if has_aux:
        value = (value, tree_map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a, aux))
    return value, tree_unflatten(treedef, grads)


def grad(f, argnums=0, has_aux=False):
    return torch.func.grad(f, argnums=argnums, has_aux=has_aux)


def vmap(f, in_axes=0, out_axes=0):
    return torch.func.vmap(f, in_dims=in_axes, out_dims=out_axes)


def jit(f, *, static_argnums=None, static_argnames=None, donate_argnums=None, compile=False):
    # eager by default; torch.compile is opt-in (compile=True)
    return torch.compile(f) if compile else f


def stop_gradient(x):
    return x.detach()


def is_tracing(x) -> bool:
    # is_compiling first: under torch.compile it is a constant, and dynamo cannot trace the other
    return torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(x)


def synchronize(tree=None):
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return tree


def add_scaled_(target, value, scale, where=None):
    # in place: the caller owns ``target`` (a training step updating its own params); with
    # ``where`` false (a 0-d bool) nothing is written, decided on the host
    if where is not None and not bool(where):
        return target
    if isinstance(scale, torch.Tensor):
        return target.addcmul_(value, scale.to(target.dtype))
    return target.add_(value, alpha=float(scale))


# ----------------------------------------------------------------------------- random

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


def normal(key, shape, dtype=torch.float32, device=None):
    return torch.randn(tuple(shape), generator=_generator(key, device), dtype=as_dtype(dtype),
                       device=device)


def rademacher(key, shape, dtype=torch.float32, device=None):
    # 64 signs from each random int64 word, unpacked byte by byte through a (256, 8) table of
    # signs: about 9x faster than torch.randn for the same count (per-element draws dominate)
    shape = tuple(shape)
    n = int(np.prod(shape))
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 63) // 64,), generator=_generator(key, device),
                          dtype=torch.int64, device=device)
    table = _sign_table(as_dtype(dtype), words.device)
    signs = torch.index_select(table, 0, words.view(torch.uint8).long())  # (bytes, 8)
    return signs.reshape(-1)[:n].reshape(shape)


_ROW_FILL_MIN = 1 << 16  # numbers per row from which draw_rows fills a normal block row by row


@torch.compiler.disable
def draw_rows(kind, keys, sizes, rows, dtype=torch.float32, device=None):
    """A ``(rows, sum(sizes))`` array; block j (its columns) depends on ``keys[j]`` alone.

    Large normal blocks (and every normal block when ``rows=1``): one generator per block,
    seeded from its key, fills the block's rows one after another in place (each row of a block
    is contiguous), so no per-block array is made and concatenated; with ``rows=1`` the numbers
    are ``normal(keys[j], (1, sizes[j]))``. Other blocks are ``kind(keys[j], (rows, sizes[j]))``
    copied in (a call per row costs more than the copy of a small block; signs are cheap).
    For the forward estimators' flat (K, n) tangents, where concatenating per-leaf normal draws
    cost about a sixth of the K=16 step (benchmarks/RESULTS.md)."""
    if kind not in ("normal", "rademacher"):
        raise ValueError(f"draw_rows: kind must be 'normal' or 'rademacher', got {kind!r}")
    sizes = [int(s) for s in sizes]
    if len(keys) != len(sizes):
        raise ValueError(f"draw_rows: one key per block: got {len(keys)} keys for {len(sizes)} sizes")
    dtype, rows = as_dtype(dtype), int(rows)
    out = torch.empty((rows, sum(sizes)), dtype=dtype, device=device)
    start = 0
    for k, size in zip(keys, sizes):
        if kind == "normal" and (rows == 1 or size >= _ROW_FILL_MIN):
            g = _generator(k, out.device)
            for r in range(rows):
                out[r, start:start + size].normal_(generator=g)
        else:  # small blocks: one draw and a copy cost less than a call per row
            draw = normal if kind == "normal" else rademacher
            out[:, start:start + size].copy_(draw(k, (rows, size), dtype=dtype, device=out.device))
        start += size
    return out


_SIGN_TABLES: dict = {}


def _sign_table(dtype, device):
    """Row b holds the eight signs (+-1) of byte b's bits: a constant, cached per dtype and device."""
    k = (dtype, str(device))
    if k not in _SIGN_TABLES:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        _SIGN_TABLES[k] = (bits * 2 - 1).to(dtype=dtype, device=device)
    return _SIGN_TABLES[k]


def uniform(key, shape, dtype=torch.float32, minval=0.0, maxval=1.0, device=None):
    u = torch.rand(tuple(shape), generator=_generator(key, device), dtype=as_dtype(dtype),
                   device=device)
    return u * (maxval - minval) + minval


def bernoulli(key, p, shape, device=None):
    return torch.rand(tuple(shape), generator=_generator(key, device), device=device) < p
