"""The PyTorch backend of duogard.

It implements :class:`duogard.backend.Backend`, where every op is documented once; the functions
here stay short, with a comment where PyTorch and JAX differ. Autodiff goes through ``torch.func``
with JAX's signatures; randomness takes explicit keys (a key is a CPU int64 tensor of two 32-bit
words, hashed into a fresh ``torch.Generator`` seed per draw). The ops live in modules by concern,
with the same names in ``duogard_jax``: ``_arrays`` (arrays, dtypes, devices, numerics), ``_nn``,
``_attention`` (attention over key blocks), ``_autodiff``, ``_random``, ``_tree``, ``_dlpack`` (the
exchange with other frameworks) and ``_memory`` (a step's memory).
"""

from __future__ import annotations

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "duogard's torch backend needs PyTorch: pip install torch==2.13.0 (CPU wheel), then "
        'pip install "duogard[torch]"'
    ) from exc
try:
    import array_api_compat.torch  # noqa: F401 - the Array API layer under _xp.xp
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        'duogard\'s torch backend needs array-api-compat: pip install "duogard[torch]"'
    ) from exc

from ._arrays import (
    as_dtype,
    asarray,
    default_device,
    device_kind,
    device_of,
    dtype_name,
    enable_float64,
    is_array,
    pin_float32_precision,
    stage,
    threads_for,
    to_numpy,
)
from ._attention import attention
from ._autodiff import (
    add_outer_,
    add_scaled_,
    checkpoint,
    compile_count,
    grad,
    grad_stream,
    is_tracing,
    jit,
    jvp,
    stop_gradient,
    sum_of_squares,
    synchronize,
    value_and_grad,
    vjp,
    vmap,
)
from ._distributed import (
    all_gather,
    all_reduce_sum,
    dist_init,
    dist_roll_call,
    dist_shutdown,
    dist_step,
    dist_world,
    host_all_gather,
    is_collective_failure,
)
from ._dlpack import (
    device_problem,
    dlpack_device,
    dlpack_export,
    dlpack_import,
    dlpack_importer,
    dlpack_share,
)
from ._facts import exchange_device, forward_mode_cause, gpu_preallocation_fixed
from ._memory import step_memory
from ._nn import (
    avg_pool2d,
    conv2d,
    conv2d_weight_grad,
    elu,
    gelu,
    layer_norm,
    leaky_relu,
    linear,
    log_softmax,
    logsumexp,
    max_pool2d,
    nll_values,
    relu,
    sigmoid,
    silu,
    softmax,
    softplus,
    tanh,
)
from ._random import (
    bernoulli,
    draw_rows,
    fold_in,
    fold_in_many,
    key,
    key_data,
    key_from_data,
    normal,
    rademacher,
    split,
    uniform,
)
from ._tree import tree_flatten, tree_leaves, tree_map, tree_structure, tree_unflatten
from ._xp import xp as _fast_xp

__all__ = [
    # identity and numerics
    "name",
    "framework",
    "framework_version",
    "install_hint",
    "fast_jvp_rules",
    "xp",
    "float32",
    "float64",
    "int32",
    "int64",
    "enable_float64",
    "pin_float32_precision",
    "threads_for",
    # framework facts
    "float64_always",
    "one_host_device",
    "streams_gradients",
    "gpu_preallocation_fixed",
    "forward_mode_cause",
    "exchange_device",
    # arrays, dtypes, devices
    "is_array",
    "as_dtype",
    "dtype_name",
    "asarray",
    "stage",
    "to_numpy",
    "default_device",
    "device_of",
    "device_kind",
    # nn ops
    "linear",
    "conv2d",
    "conv2d_weight_grad",
    "max_pool2d",
    "avg_pool2d",
    "relu",
    "leaky_relu",
    "gelu",
    "sigmoid",
    "softplus",
    "elu",
    "silu",
    "tanh",
    "softmax",
    "log_softmax",
    "nll_values",
    "logsumexp",
    "layer_norm",
    "attention",
    # autodiff and compilation
    "jvp",
    "vjp",
    "value_and_grad",
    "grad",
    "grad_stream",
    "vmap",
    "jit",
    "checkpoint",
    "compile_count",
    "sum_of_squares",
    "stop_gradient",
    "is_tracing",
    "synchronize",
    "add_outer_",
    "add_scaled_",
    # memory
    "step_memory",
    # randomness
    "key",
    "split",
    "fold_in",
    "fold_in_many",
    "key_data",
    "key_from_data",
    "normal",
    "rademacher",
    "uniform",
    "bernoulli",
    "draw_rows",
    # pytrees
    "tree_map",
    "tree_leaves",
    "tree_flatten",
    "tree_unflatten",
    "tree_structure",
    # the DLPack exchange
    "dlpack_device",
    "device_problem",
    "dlpack_export",
    "dlpack_import",
    "dlpack_share",
    "dlpack_importer",
    # data-parallel runs
    "dist_init",
    "dist_roll_call",
    "dist_world",
    "dist_step",
    "all_reduce_sum",
    "all_gather",
    "host_all_gather",
    "dist_shutdown",
    "is_collective_failure",
]

name = "torch"
framework = "torch"
install_hint = 'pip install torch==2.13.0 "duogard[torch]"'
#: use duogard's hand-written forward rules for its own layers where they apply?
fast_jvp_rules = True  # torch.func.jvp pays for dual tensors op by op; duogard's own rules are faster
float64_always = True  # torch holds float64 whenever asked
one_host_device = True  # every CPU tensor is in the one host memory: torch's CPU has no index
streams_gradients = True  # eager autograd hands each gradient over as it completes (grad_stream)
xp = _fast_xp  # array_api_compat.torch, its per-step calls sent straight to torch

float32 = torch.float32
float64 = torch.float64
int32 = torch.int32
int64 = torch.int64


def framework_version() -> str:
    return torch.__version__
