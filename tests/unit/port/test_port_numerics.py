"""The torch.export lowering agrees with eager torch where the array API's defaults differ:
casts of floats to narrow integers wrap, type promotion with Python scalars and integer
division gives torch's float32, float64 resampling stays
float64, a norm's forward gradient at a zero vector is 0, 64-bit results are refused (not
silently narrowed) when JAX's 64-bit mode is off, bfloat16 modules port; and a seeded fuzzer
compares random small op combinations (outputs and JVPs) over four float dtypes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import torch.nn as tnn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from duogard.interop import from_torch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


class Fn(tnn.Module):
    """A module whose forward is ``fn(x)`` (no parameters unless ``width`` is given)."""

    def __init__(self, fn, width=None):
        super().__init__()
        self.fn = fn
        if width is not None:
            gen = torch.Generator().manual_seed(0)
            self.w = tnn.Parameter(torch.randn(width, width, generator=gen) / width**0.5)
            self.b = tnn.Parameter(torch.randn(width, generator=gen) * 0.1)

    def forward(self, x):
        return self.fn(self, x)


def _lowered(fn, x: torch.Tensor, width=None):
    module = Fn(fn, width)
    model = from_torch(module, x)
    got = model.apply(model.params, jnp.asarray(x.numpy()))
    assert model.lowered_path == "export"
    return module, model, got


def _np(a):
    a = np.asarray(a.detach() if isinstance(a, torch.Tensor) else a)
    return a


# ----------------------------------------------------------------------------- casts


def test_float_to_narrow_integer_casts_wrap_as_in_torch():
    x = torch.tensor([-3.7, 300.5, -200.2, 0.9, 255.5, -129.0, 70000.25])
    for dtype in (torch.uint8, torch.int8, torch.int16):
        module, _, got = _lowered(lambda m, x, _d=dtype: x.to(_d), x)
        want = module(x)
        assert str(got.dtype) == str(want.dtype).removeprefix("torch.")
        np.testing.assert_array_equal(np.asarray(got), want.numpy(), err_msg=str(dtype))


# ----------------------------------------------------------------------------- promotion


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8])
def test_integer_promotion_with_python_floats_and_true_division_gives_float32(dtype):
    x = torch.tensor([3, -4, 7, 0], dtype=dtype)
    cases = {
        "int * float": lambda m, x: x * 0.1,
        "int + float": lambda m, x: x + 0.1,
        "int / int": lambda m, x: x / (x.abs() + 3),
        "int / float": lambda m, x: x / 3.0,
        "sqrt(int)": lambda m, x: torch.sqrt(x.abs()),
        "exp(int)": lambda m, x: torch.exp(x * 0.25),
        "clamp(int, float)": lambda m, x: torch.clamp(x, min=0.5),
        "float - int": lambda m, x: 1.3 - x,
    }
    for name, fn in cases.items():
        module, _, got = _lowered(fn, x)
        want = module(x)
        assert want.dtype == torch.float32
        assert got.dtype == jnp.float32, f"{name}: {got.dtype}"
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-6, atol=1e-7, err_msg=name)


# ----------------------------------------------------------------------------- precision


def test_float64_resampling_is_computed_in_float64():
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 2, 7, 5)))
    cases = {
        "bilinear": lambda m, x: F.interpolate(x, scale_factor=1.7, mode="bilinear"),
        "bilinear, aligned": lambda m, x: F.interpolate(x, size=(9, 4), mode="bilinear", align_corners=True),
        "adaptive average": lambda m, x: F.adaptive_avg_pool2d(x, (3, 3)),
    }
    for name, fn in cases.items():
        module, _, got = _lowered(fn, x)
        want = module(x)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-13, atol=1e-14, err_msg=name)


# ----------------------------------------------------------------------------- norms at zero


def test_forward_gradient_of_a_norm_at_a_zero_vector_is_zero_as_in_torch():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, -1.0, 0.5], [0.3, 0.2, -0.1]], dtype=torch.float64)
    cases = {
        "2-norm": lambda m, x: torch.linalg.vector_norm(x, dim=1),
        "3-norm": lambda m, x: torch.linalg.vector_norm(x, ord=3, dim=1),
        "F.normalize": lambda m, x: F.normalize(x, dim=1),
        "torch.norm": lambda m, x: torch.norm(x, dim=1, keepdim=True) * x,
    }
    for name, fn in cases.items():
        module, model, _ = _lowered(fn, x)
        want, dwant = torch.func.jvp(module, (x,), (t,))
        got, dgot = jax.jvp(
            lambda v: model.apply(model.params, v), (jnp.asarray(x.numpy()),), (jnp.asarray(t.numpy()),)
        )
        assert np.isfinite(np.asarray(dgot)).all(), name
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-12, atol=1e-14, err_msg=name)
        np.testing.assert_allclose(np.asarray(dgot), dwant.numpy(), rtol=1e-12, atol=1e-14, err_msg=name)


# ----------------------------------------------------------------------------- bfloat16


def test_a_bfloat16_module_ports():
    torch.manual_seed(0)
    module = tnn.Sequential(tnn.Linear(3, 4), tnn.Tanh(), tnn.Linear(4, 2)).to(torch.bfloat16)
    x = torch.randn(5, 3).to(torch.bfloat16)
    model = from_torch(module, x)
    assert all(v.dtype.name == "bfloat16" for v in model.params.values())
    got = model.apply(model.params, jnp.asarray(x.float().numpy(), dtype=jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    with torch.no_grad():
        want = module(x).float().numpy()
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want, rtol=2e-2, atol=2e-2)
    # the torch path and init(dtype=...) take the ml_dtypes params too
    assert model.apply(model.params, x).dtype == torch.bfloat16
    assert all(v.dtype == np.float32 for v in model.init(dtype="float32").values())


# ----------------------------------------------------------------------------- JAX without 64 bits


@pytest.mark.integration  # starts a Python process
def test_64_bit_results_are_refused_when_jax_x64_is_off():
    code = """
        import warnings
        warnings.simplefilter("ignore")
        import numpy as np, torch, jax, jax.numpy as jnp
        from duogard.interop import from_torch
        assert not jax.config.jax_enable_x64

        class Wide(torch.nn.Module):
            def forward(self, x):
                return (x * 1e6).to(torch.int64) * 4096  # 1.2e10: int32 would wrap

        x = torch.tensor([3.0, 1.0])
        model = from_torch(Wide(), x)
        try:
            model.apply(model.params, jnp.asarray(x.numpy()))
        except TypeError as exc:
            msg = str(exc)
            assert "int64" in msg and "aten._to_copy.default" in msg, msg
            assert "jax_enable_x64" in msg, msg
        else:
            raise AssertionError("no error for an int64 result")

        # bounded int64 results (positions, indices) and eval batch norm still run in 32 bits
        class Positions(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = torch.nn.Embedding(8, 3)
                self.bn = torch.nn.BatchNorm1d(4)

            def forward(self, x):
                return self.bn(x + self.emb(torch.arange(x.shape[1])))

        module = Positions().eval()
        x = torch.randn(2, 4, 3)
        model = from_torch(module, x)
        got = model.apply(model.params, jnp.asarray(x.numpy()))
        np.testing.assert_allclose(np.asarray(got), module(x).detach().numpy(), rtol=1e-5, atol=1e-6)

        # max pooling's int64 indices address one input plane: they run in 32 bits too
        pool = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.MaxPool2d(3, 2, ceil_mode=True))
        x = torch.randn(1, 1, 9, 9)
        model = from_torch(pool, x)
        got = model.apply(model.params, jnp.asarray(x.numpy()))
        np.testing.assert_allclose(np.asarray(got), pool(x).detach().numpy(), rtol=1e-5, atol=1e-6)
        print("ok")
    """
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr


# ----------------------------------------------------------------------------- the fuzzer

_FUZZ_OPS = {
    "tanh": lambda m, x: torch.tanh(x),
    "sigmoid": lambda m, x: torch.sigmoid(x) - 0.5,
    "gelu": lambda m, x: F.gelu(x),
    "silu": lambda m, x: F.silu(x),
    "softplus": lambda m, x: F.softplus(x) - 0.7,
    "affine": lambda m, x: x * 0.75 + 0.25,
    "divide": lambda m, x: x / 1.5 - 1,
    "square": lambda m, x: x * x * 0.5,
    "sin": lambda m, x: torch.sin(x),
    "exp": lambda m, x: torch.exp(-x * x),
    "pow": lambda m, x: (x.abs() + 0.5) ** 1.5,
    "softmax": lambda m, x: F.softmax(x, dim=-1),
    "log_softmax": lambda m, x: F.log_softmax(x, dim=-1),
    "layer_norm": lambda m, x: F.layer_norm(x, x.shape[-1:]),
    "center": lambda m, x: x - x.mean(-1, keepdim=True),
    "normalize": lambda m, x: F.normalize(x, dim=-1),
    "norm": lambda m, x: x * torch.linalg.vector_norm(F.relu(x - 1), dim=0, keepdim=True),  # zeros
    "cumsum": lambda m, x: x.cumsum(-1) * 0.3,
    "flip": lambda m, x: x.flip(-1),
    "transpose": lambda m, x: x.t(),
    "linear": lambda m, x: x @ m.w + m.b,
    "scale by w": lambda m, x: x * m.w,
    "int scale": lambda m, x: x * ((torch.arange(x.shape[-1]) + 1) * 0.3).to(x.dtype),  # float32 in torch
}
#: (rtol, atol) of a result relative to its largest entry (torch computes half types in float32
#: within each operator, XLA may not)
_FUZZ_TOL = {
    torch.float64: 1e-11,
    torch.float32: 2e-5,
    torch.float16: 2e-2,
    torch.bfloat16: 6e-2,
}


def _close(got, want, tol, what):
    got = np.asarray(got, dtype=np.float64)
    want = want.detach().to(torch.float64).numpy()
    assert got.shape == want.shape, what
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert np.isfinite(got).all() and err <= tol * scale, f"{what}: max error {err:.3g}, scale {scale:.3g}"


def test_fuzzer_random_op_combinations_match_torch_outputs_and_jvps():
    """Eight seeded combinations of three random ops (and a linear map) in each of four dtypes:
    one module per dtype returns every combination's result, so one export and one compiled
    JVP cover them all.
    """
    rng = np.random.default_rng(26)
    names = sorted(_FUZZ_OPS)
    combos = [
        [names[i] for i in rng.choice(len(names), size=3, replace=False)] + ["linear"] for _ in range(8)
    ]
    x64 = torch.from_numpy(rng.normal(size=(4, 4)))
    tangents64 = {"w": rng.normal(size=(4, 4)), "b": rng.normal(size=4)}

    def forward(m, x):
        return tuple(_apply(ops, m, x) for ops in combos)

    for dtype, tol in _FUZZ_TOL.items():
        module = Fn(forward, width=4).to(dtype)
        x = x64.to(dtype)
        params = {k: v.detach() for k, v in module.named_parameters()}
        tangents = {k: torch.from_numpy(v).to(dtype) for k, v in tangents64.items()}
        want, dwant = torch.func.jvp(
            lambda p: torch.func.functional_call(module, p, (x,)), (params,), (tangents,)
        )
        model = from_torch(module, x)
        jdt = jnp.dtype(str(dtype).removeprefix("torch."))
        xj = jnp.asarray(x64.numpy(), dtype=jdt)
        pj = {k: jnp.asarray(v, dtype=jdt) for k, v in model.params.items()}
        tj = {k: jnp.asarray(v, dtype=jdt) for k, v in tangents64.items()}
        got, dgot = jax.jit(lambda p, t: jax.jvp(lambda q: model.apply(q, xj), (p,), (t,)))(pj, tj)
        assert model.lowered_path == "export"
        for ops, g, w, dg_, dw in zip(combos, got, want, dgot, dwant):
            what = f"{ops} in {dtype}"
            wdt = jnp.dtype(str(w.dtype).removeprefix("torch."))
            assert g.dtype == wdt and dg_.dtype == wdt, f"{what}: {g.dtype}, {dg_.dtype}, torch {wdt}"
            _close(g, w, tol, f"{what}, output")
            _close(dg_, dw, tol, f"{what}, jvp")


def _apply(ops, m, x):
    for name in ops:
        x = _FUZZ_OPS[name](m, x)
    return x
