"""The JAX backend of duogard.

It implements :class:`duogard.backend.Backend`, where every op is documented once; the functions
here stay short, with a comment where JAX and PyTorch differ. The ops live in modules by concern,
with the same names in ``duogard_torch``: ``_arrays`` (arrays, dtypes, devices, numerics), ``_nn``,
``_attention`` (attention over key blocks), ``_autodiff``, ``_random``, ``_tree``, ``_dlpack`` (the
exchange with other frameworks) and ``_memory`` (a step's memory).
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
        'duogard\'s jax backend needs JAX: pip install "duogard[jax]" (or pip install jax)'
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

name = "jax"
framework = "jax"
install_hint = 'pip install "duogard[jax]"'
#: use duogard's hand-written forward rules for its own layers where they apply?
fast_jvp_rules = False  # jax.jvp through XLA is as fast as hand-written rules
float64_always = False  # float64 only in JAX's 64-bit mode (enable_float64)
one_host_device = False  # JAX tells its CPU devices apart (--xla_force_host_platform_device_count)
streams_gradients = False  # one compiled program computes the whole gradient (grad_stream)
xp = jnp

float32 = jnp.float32
float64 = jnp.float64
int32 = jnp.int32
int64 = jnp.int64


def framework_version() -> str:
    return jax.__version__
