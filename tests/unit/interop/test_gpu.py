"""JAX and PyTorch on one GPU: precision pinning, preallocation, and the CUDA exchange paths.

The first tests check what a CPU can observe (flags set and restored, the environment
rule). The CUDA tests skip without a CUDA GPU (and, for the JAX side, without a CUDA
build of JAX).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import duogard as dg
from duogard.interop import pin_matmul_precision

from helpers import has_cuda

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
jnp = jax.numpy

NEW_TORCH_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")
TORCH_KNOBS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")


def _knob(path):
    obj = torch.backends
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def torch_precision() -> dict:
    if NEW_TORCH_API:
        return {p: _knob(p).fp32_precision for p in TORCH_KNOBS}
    return {
        "matmul": torch.backends.cuda.matmul.allow_tf32,
        "cudnn": torch.backends.cudnn.allow_tf32,
        "precision": torch.get_float32_matmul_precision(),
    }


def run_python(code: str, env: dict) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


# ----------------------------------------------------------------------------- CPU-observable


def test_pin_matmul_precision_sets_and_restores():
    jax.config.update("jax_default_matmul_precision", "tensorfloat32")  # a non-default start
    try:
        before = torch_precision()
        with pin_matmul_precision():
            assert jax.config.jax_default_matmul_precision == "highest"
            inside = torch_precision()
            assert torch.backends.cuda.matmul.allow_tf32 is False
            if NEW_TORCH_API:
                assert set(inside.values()) == {"ieee"}, inside
            else:
                assert inside == {"matmul": False, "cudnn": False, "precision": "highest"}
        assert torch_precision() == before
        assert jax.config.jax_default_matmul_precision == "tensorfloat32"
        # restored after an exception too, and usable as a decorator
        with pytest.raises(RuntimeError, match="boom"):
            with pin_matmul_precision():
                raise RuntimeError("boom")
        assert torch_precision() == before

        @pin_matmul_precision()
        def pinned():
            return jax.config.jax_default_matmul_precision

        assert pinned() == "highest"
        assert jax.config.jax_default_matmul_precision == "tensorfloat32"
    finally:
        jax.config.update("jax_default_matmul_precision", None)


@pytest.mark.skipif(not NEW_TORCH_API, reason="torch < 2.9 has no fp32_precision API")
def test_pin_overrides_a_user_tf32_parent_setting():
    # Set through torch's new API, a parent "tf32" defeats the legacy
    # cudnn.allow_tf32 = False; duogard sets every leaf to "ieee" instead.
    saved = {p: _knob(p).fp32_precision for p in TORCH_KNOBS}
    saved_parent = torch.backends.cudnn.fp32_precision
    try:
        torch.backends.cudnn.fp32_precision = "tf32"
        before = torch_precision()
        assert before["cudnn.conv"] == "tf32"
        with pin_matmul_precision():
            assert torch_precision()["cudnn.conv"] == "ieee"
            assert torch_precision()["cudnn.rnn"] == "ieee"
        assert torch_precision() == before
    finally:
        torch.backends.cudnn.fp32_precision = saved_parent
        for p, value in saved.items():
            _knob(p).fp32_precision = value


@pytest.mark.integration  # starts a Python process
def test_configure_shared_gpu_environment_rule():
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
    env["JAX_PLATFORMS"] = "cpu"  # starting JAX's backends here must not touch a GPU
    out = run_python(
        """
        import os, sys, warnings
        from duogard.interop import configure_shared_gpu
        VAR = "XLA_PYTHON_CLIENT_PREALLOCATE"
        assert "jax" not in sys.modules
        with warnings.catch_warnings():
            warnings.simplefilter("error")           # no warning before JAX starts
            assert configure_shared_gpu() == "false" and os.environ[VAR] == "false"
        os.environ[VAR] = "true"                     # the user's value is kept
        assert configure_shared_gpu() == "true" and os.environ[VAR] == "true"
        del os.environ[VAR]
        import jax
        with warnings.catch_warnings():
            warnings.simplefilter("error")           # importing JAX does not start backends
            assert configure_shared_gpu(preallocate=True) == "true"
        del os.environ[VAR]
        jax.devices()                                # now the backends have started
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert configure_shared_gpu() == "false"
        assert any(issubclass(w.category, RuntimeWarning) and "already started" in str(w.message)
                   for w in caught), [str(w.message) for w in caught]
        print("env rule OK")
    """,
        env,
    )
    assert "env rule OK" in out


# ----------------------------------------------------------------------------- CUDA


def _jax_has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


needs_cuda = pytest.mark.skipif(not has_cuda(), reason="needs a CUDA GPU")
needs_cuda_jax = pytest.mark.skipif(
    not (has_cuda() and _jax_has_gpu()), reason="needs a CUDA GPU and a CUDA build of JAX"
)


@needs_cuda_jax
def test_cuda_exchange_is_zero_copy_both_ways():
    t = torch.arange(1024, dtype=torch.float32, device="cuda").reshape(32, 32)
    j = dg.convert(t, to="jax", copy=False)
    assert j.devices() == {jax.devices("gpu")[0]}
    assert j.unsafe_buffer_pointer() == t.data_ptr()
    np.testing.assert_array_equal(np.asarray(j), t.cpu().numpy())
    j2 = jax.device_put(jnp.arange(1024, dtype=jnp.float32), jax.devices("gpu")[0]) * 3
    t2 = dg.convert(j2, to="torch", copy=False)
    assert t2.device.type == "cuda" and t2.data_ptr() == j2.unsafe_buffer_pointer()
    np.testing.assert_array_equal(t2.cpu().numpy(), np.asarray(j2))
    # a transposed view converts (zero-copy on CPU; on GPU not asserted: XLA's GPU client may
    # refuse the permuted layout, and then duogard copies); a misaligned one is copied
    np.testing.assert_array_equal(np.asarray(dg.convert(t.T, to="jax")), t.T.cpu().numpy())
    mis = t.reshape(-1)[1:9]
    jm = dg.convert(mis, to="jax")
    assert jm.unsafe_buffer_pointer() != mis.data_ptr()
    np.testing.assert_array_equal(np.asarray(jm), mis.cpu().numpy())


@needs_cuda_jax
def test_cuda_exchange_orders_streams():
    # Work queued on a side stream must finish before the consumer reads the buffer:
    # the consumer passes its stream to __dlpack__ and the producer makes it wait.
    n = 2048
    ones = torch.ones(n, n, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        a = ones @ ones  # every entry n, exactly; queued, not finished
        for _ in range(4):
            a = a @ ones / n  # enough work to still be running when JAX reads
        j = dg.convert(a, to="jax")
        total = float(jnp.sum(j))
    torch.cuda.synchronize()
    assert total == float(n) ** 3  # exact in float32: a race would read other memory
    # and JAX -> torch: torch's current stream waits for JAX's computation
    x = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices("gpu")[0])
    y = x @ x  # asynchronous
    t = dg.convert(y, to="torch")
    assert float(t.sum()) == float(n) ** 3


@needs_cuda
def test_cpu_and_cuda_leaves_need_a_device():
    tree = {"a": torch.ones(3), "b": torch.ones(3, device="cuda")}
    with pytest.raises(ValueError, match=r"different devices.*'a' on cpu.*'b' on cuda:0"):
        dg.convert(tree, to="torch")
    on_gpu = dg.convert(tree, to="torch", device="cuda:0")
    assert all(v.device.type == "cuda" for v in on_gpu.values())
    assert on_gpu["b"].data_ptr() == tree["b"].data_ptr()  # already there: not moved
    on_cpu = dg.convert(tree, to="numpy", device="cpu")
    np.testing.assert_array_equal(on_cpu["b"], np.ones(3))
    with pytest.raises(ValueError, match="NumPy arrays live in host memory.*device='cpu'"):
        dg.convert({"b": tree["b"]}, to="numpy")
    with pytest.raises(ValueError, match="a move from cuda:0 to cpu"):
        dg.convert(tree["b"], to="torch", device="cpu", copy=False)


@needs_cuda
def test_cuda_to_jax_with_device_cpu_moves_first():
    t = torch.arange(6, dtype=torch.float32, device="cuda")
    j = dg.convert(t, to="jax", device="cpu")  # works with a CPU-only JAX too
    assert j.devices() == {jax.devices("cpu")[0]}
    np.testing.assert_array_equal(np.asarray(j), np.arange(6))
    if not _jax_has_gpu():
        with pytest.raises(ValueError, match="CUDA build of JAX"):
            dg.convert(t, to="jax")


@pytest.mark.skipif(not has_cuda() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_need_a_device():
    tree = [torch.ones(2, device="cuda:0"), torch.ones(2, device="cuda:1")]
    with pytest.raises(ValueError, match="cuda:0.*cuda:1"):
        dg.convert(tree, to="torch")
    moved = dg.convert(tree, to="torch", device="cuda:1")
    assert [t.device.index for t in moved] == [1, 1]


@needs_cuda_jax
def test_pinned_precision_makes_float32_matmuls_agree():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512)).astype(np.float32)
    b = rng.standard_normal((512, 512)).astype(np.float32)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    with pin_matmul_precision():
        out_t = (torch.from_numpy(a).cuda() @ torch.from_numpy(b).cuda()).cpu().numpy()
        ja = jax.device_put(a, jax.devices("gpu")[0])
        out_j = np.asarray(ja @ jax.device_put(b, jax.devices("gpu")[0]))
    scale = np.abs(ref).max()
    assert np.abs(out_t - ref).max() / scale < 1e-5  # TF32 would be ~1e-3
    assert np.abs(out_j - ref).max() / scale < 1e-5


@pytest.mark.integration  # starts a Python process
@needs_cuda_jax
def test_jax_does_not_preallocate_next_to_torch():
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
    out = run_python(
        """
        import torch, duogard as dg
        torch.ones(1, device="cuda")
        be = dg.backend("jax")            # sets XLA_PYTHON_CLIENT_PREALLOCATE=false by default
        be.xp.ones(1).block_until_ready()
        free, total = torch.cuda.mem_get_info()
        print(free / total)
    """,
        env,
    )
    assert float(out.strip().splitlines()[-1]) > 0.5


@needs_cuda
def test_torch_step_memory_on_cuda_is_the_allocators_peak():
    """On CUDA the step memory is the caching allocator's peak beyond what was allocated at
    entry: the hand case of tests/test_train.py (3 S alive at once; the params and batch, the
    in-place update and what the step frees are not counted), on the GPU."""
    be = dg.backend("torch")
    side = 256
    s = side * side * 4
    p, x = (torch.full((side, side), v, device="cuda") for v in (1.0, 2.0))

    def step(p, x):
        a = x + 1  # S
        b, c = a * x, a + x  # 3 S
        p.add_(b, alpha=0.5)  # in place: 3 S
        del a, c
        return p + 1, b  # 2 S

    step(p, x)  # CUDA context and kernels loaded before the measurement
    assert 3 * s <= be.step_memory(step, p, x) <= 3 * s + 4096
    assert torch.cuda.memory_allocated() >= 2 * s  # the caller's params and batch are kept
