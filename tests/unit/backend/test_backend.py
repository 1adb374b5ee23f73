"""Backend registry, selection order, contract names, errors."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import duogard as dg
from duogard.backend import CONTRACT, Backend, ExportedArray


def _public(module) -> set[str]:
    """A module's public names, without imported modules (``jax``, ``torch``, submodules) but
    with the contract's (``xp``)."""
    return {
        n
        for n in vars(module)
        if not n.startswith("_")
        and n != "annotations"
        and (n in CONTRACT or not isinstance(getattr(module, n), type(os)))
    }


def _parameters(fn, *, method: bool = False) -> list[tuple]:
    params = list(inspect.signature(fn).parameters.values())[1 if method else 0 :]
    return [(p.name, p.kind, p.default) for p in params]


@pytest.mark.integration  # starts a Python process
def test_import_duogard_imports_no_framework():
    code = textwrap.dedent("""
        import sys, duogard, duogard.nn, duogard.losses, duogard.optim, duogard.grad
        bad = [m for m in ("jax", "torch") if m in sys.modules]
        assert not bad, bad
        print("clean")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "clean" in out.stdout


def test_backend_modules_have_identical_public_names(both):
    jx, th = both
    names_jax, names_torch = _public(jx), _public(th)
    assert names_jax == names_torch, names_jax ^ names_torch
    assert set(CONTRACT) <= names_jax


def test_contract_is_the_protocol():
    methods = [n for n in dir(Backend) if inspect.isfunction(getattr(Backend, n)) and not n.startswith("_")]
    assert set(CONTRACT) == set(methods) | set(inspect.get_annotations(Backend))
    assert {"key", "normal", "draw_rows"} <= set(CONTRACT)  # the randomness part (RandomOps)
    assert len(CONTRACT) == len(set(CONTRACT))
    for n in ("enable_float64", "pin_float32_precision"):
        assert n in CONTRACT and getattr(Backend, n).__doc__
    for n in ("dlpack_export", "dlpack_import", "draw_rows", "conv2d"):
        assert n in CONTRACT and "Args:" in getattr(Backend, n).__doc__


def test_backends_implement_the_protocol(be):
    """Every contract name is there, and every op has the Protocol's parameters (names, kinds,
    defaults)."""
    for n in CONTRACT:
        assert hasattr(be, n), n
        spec = getattr(Backend, n, None)
        if inspect.isfunction(spec):
            assert _parameters(getattr(be, n)) == _parameters(spec, method=True), n
        else:
            assert not callable(getattr(be, n)) or n == "xp" or n.startswith(("float", "int")), n
    assert set(be.__all__) == set(CONTRACT)  # the package re-exports the contract, nothing else
    assert isinstance(be.name, str) and be.framework == be.name  # registered under the framework's name
    assert isinstance(be.fast_jvp_rules, bool)


@pytest.mark.integration  # starts a Python process
def test_backend_of_loads_a_backend_only_for_an_imported_framework():
    code = textwrap.dedent("""
        import sys
        import numpy as np
        import duogard as dg
        assert dg.backend_of(np.ones(2), fallback=False) is None
        assert dg.backend_of(3.0, fallback=False) is None
        assert not [m for m in ("jax", "torch") if m in sys.modules]  # nothing imported to ask
        import torch
        assert dg.backend_of(torch.ones(2)).name == "torch"  # loaded on demand: torch was imported
        assert "jax" not in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_backend_of_defaults_for_values_no_backend_owns(both):
    jx, th = both
    assert dg.backend_of(np.ones(2), default="torch") is th
    assert dg.backend_of(np.ones(2), default=jx) is jx
    assert dg.backend_of([1.0], fallback=False) is None


def test_dlpack_pair_exchanges_zero_copy(both):
    jx, th = both
    import torch

    t = torch.arange(16, dtype=torch.float32, requires_grad=True)
    ex = th.dlpack_export(t)
    assert isinstance(ex, ExportedArray) and ex.backend is th and not ex.fresh
    assert (ex.dtype, ex.shape, ex.strides, ex.device) == ("float32", (16,), (1,), ("cpu", 0))
    assert ex.address == t.data_ptr() and not ex.array.requires_grad and t.requires_grad
    j = jx.dlpack_import(ex)
    assert j.unsafe_buffer_pointer() == t.data_ptr()
    back = th.dlpack_import(jx.dlpack_export(j))
    assert back.data_ptr() == t.data_ptr()
    own = th.dlpack_import(th.dlpack_export(t), copy=True)  # the same framework: a copy of its own
    assert own.data_ptr() != t.data_ptr() and torch.equal(own, t.detach())
    fresh = ex.copy(dtype="float64")  # the source framework copies: dense row-major
    assert fresh.fresh and fresh.dtype == "float64" and fresh.address != ex.address
    with pytest.raises(ValueError, match="strided view"):
        jx.dlpack_import(th.dlpack_export(t.detach()[::2]), copy=False)
    with pytest.raises(ValueError, match="a move from cpu to cuda:0"):
        th.dlpack_export(t, device=("cuda", 0), copy=False)


def test_device_problem_and_dlpack_device(be):
    x = be.asarray(np.ones(3, np.float32))
    assert be.dlpack_device(x) == ("cpu", 0)
    assert be.device_problem(("cpu", 0)) is None
    assert be.device_problem(("cuda", 99)) is not None


def test_enable_float64_and_pinned_precision(be):
    be.enable_float64()  # conftest has switched JAX's 64-bit mode on already: a no-op here
    assert be.dtype_name(be.asarray(np.ones(2), dtype="float64").dtype) == "float64"
    restore = be.pin_float32_precision()
    restore()


@pytest.mark.integration  # starts a Python process
def test_enable_float64_switches_jax_to_64_bits():
    code = textwrap.dedent("""
        import numpy as np
        import duogard as dg
        be = dg.backend("jax")
        try:
            be.asarray(np.ones(2), dtype="float64")
        except TypeError:
            pass
        else:
            raise AssertionError("float64 without 64-bit mode")
        be.enable_float64()
        assert be.dtype_name(be.asarray(np.ones(2), dtype="float64").dtype) == "float64"
        print("ok")
    """)
    env = dict(os.environ, JAX_ENABLE_X64="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_selection_order(both, monkeypatch):
    monkeypatch.delenv("DUOGARD_BACKEND", raising=False)
    assert dg.backend().name == "jax"  # default: jax when installed
    monkeypatch.setenv("DUOGARD_BACKEND", "torch")
    assert dg.backend().name == "torch"  # environment beats the default
    with dg.use_backend("jax"):
        assert dg.backend().name == "jax"  # context beats the environment
        assert dg.backend("torch").name == "torch"  # the argument beats everything
        with dg.use_backend("torch"):
            assert dg.backend().name == "torch"
        assert dg.backend().name == "jax"
    assert dg.backend().name == "torch"


def test_unknown_backend_lists_names():
    with pytest.raises(ValueError, match=r"unknown backend 'tensorflow'.*'jax'.*'torch'"):
        dg.backend("tensorflow")


def test_available_backends_reports_versions(both):
    infos = {b.name: b for b in dg.available_backends()}
    import jax
    import torch

    assert infos["jax"].available and infos["jax"].version == jax.__version__
    assert infos["torch"].available and infos["torch"].version == torch.__version__


@pytest.mark.integration  # starts a Python process
def test_missing_framework_says_how_to_install(tmp_path):
    # hide torch from a subprocess: the torch backend must say which extra to install
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    code = textwrap.dedent("""
        import duogard as dg
        try:
            dg.backend("torch")
        except ImportError as e:
            print("MSG:", e)
        print([str(b) for b in dg.available_backends() if b.name == "torch"])
    """)
    # in front of the caller's path, which may name a checkout's backends (not the installed ones)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert 'pip install "duogard[torch]"' in out.stdout
    assert "unavailable" in out.stdout


def test_backend_of_arrays(be):
    x = be.asarray(np.ones(3, np.float32))
    assert dg.backend_of(x) is be
    assert be.is_array(x) and not be.is_array(np.ones(3))


def test_roundtrip_and_dtypes(be):
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    for dt in ("float32", "float64"):
        x = be.asarray(a, dtype=dt)
        assert be.dtype_name(x.dtype) == dt
        np.testing.assert_array_equal(be.to_numpy(x), a.astype(dt))
    assert be.device_kind(be.asarray(a)) == "cpu"


def test_random_keys_are_explicit_and_deterministic(be):
    k = be.key(0)
    a = be.to_numpy(be.normal(k, (1000,)))
    b = be.to_numpy(be.normal(k, (1000,)))
    np.testing.assert_array_equal(a, b)  # same key, same numbers
    k1, k2 = be.split(k)
    c = be.to_numpy(be.normal(k1, (1000,)))
    d = be.to_numpy(be.normal(k2, (1000,)))
    assert not np.array_equal(c, d) and not np.array_equal(a, c)
    e = be.to_numpy(be.normal(be.fold_in(k, 1), (1000,)))
    assert not np.array_equal(a, e)
    assert abs(a.mean()) < 0.1 and abs(a.std() - 1) < 0.1
    r = be.to_numpy(be.rademacher(k, (10001,)))
    assert set(np.unique(r)) == {-1.0, 1.0} and abs(r.mean()) < 0.05
    u = be.to_numpy(be.uniform(k, (1000,), minval=2.0, maxval=3.0))
    assert u.min() >= 2.0 and u.max() < 3.0
    m = be.to_numpy(be.bernoulli(k, 0.25, (4000,)))
    assert abs(m.mean() - 0.25) < 0.03
    # a key survives a round trip through its data (checkpoints)
    k3 = be.key_from_data(be.key_data(k1))
    np.testing.assert_array_equal(be.to_numpy(be.normal(k3, (1000,))), c)


def test_autodiff_signatures_match_jax(be):
    def f(x):
        return be.xp.sum(x**3)

    x = be.asarray(np.array([1.0, 2.0], np.float64))
    v, g = be.value_and_grad(f)(x)
    assert float(v) == 9.0
    np.testing.assert_allclose(be.to_numpy(g), [3.0, 12.0])
    out, t = be.jvp(f, (x,), (be.asarray(np.array([1.0, 0.0])),))
    assert float(out) == 9.0 and float(t) == 3.0
    out, vjp_fn = be.vjp(f, x)
    (gx,) = vjp_fn(be.asarray(np.array(1.0)))
    np.testing.assert_allclose(be.to_numpy(gx), [3.0, 12.0])
    sq = be.vmap(lambda r: be.xp.sum(r * r))(be.asarray(np.arange(6.0).reshape(3, 2)))
    np.testing.assert_allclose(be.to_numpy(sq), [1.0, 13.0, 41.0])
    np.testing.assert_allclose(be.to_numpy(be.jit(f)(x)), 9.0)


def test_sum_of_squares_of_one_leaf_has_the_bits_of_that_leaf_among_others(be):
    """The in-backward step sums |g|² one leaf at a time (torch takes a shorter path for one
    leaf): the same bits as the leaf's part in a call over several (a zero leaf adds exactly 0)."""
    rng = np.random.default_rng(0)
    for shape in [(10,), (128, 64), (256, 256), (3, 3, 4, 4)]:
        for dtype in (np.float32, np.float64):
            x = be.asarray((3 * rng.standard_normal(shape)).astype(dtype))
            zero = be.asarray(np.zeros(1, dtype))
            one, many = be.sum_of_squares([x]), be.sum_of_squares([x, zero])
            assert np.asarray(be.to_numpy(one)).tobytes() == np.asarray(be.to_numpy(many)).tobytes()


def test_grad_stream_hands_each_gradient_over_once(be):
    """``grad_stream``: value_and_grad's value and gradient, each leaf handed over once (zeros
    for a leaf the value does not depend on); where the backend streams gradients (torch), the
    last layer's comes first, while the earlier ones are still to be computed, and ``apply`` may
    overwrite a leaf it was handed without changing the gradients still to come."""
    rng = np.random.default_rng(0)
    params = {k: be.asarray(rng.normal(size=s)) for k, s in (("a", (4, 3)), ("b", (2, 4)), ("unused", (2,)))}
    x = be.asarray(rng.normal(size=(5, 3)))

    def f(p, x):
        h = be.xp.tanh(x @ be.xp.matrix_transpose(p["a"]))
        return be.xp.sum((h @ be.xp.matrix_transpose(p["b"])) ** 2)

    want_v, want = be.value_and_grad(f)(params, x)
    value, backward = be.grad_stream(f, params, x)
    assert float(value) == pytest.approx(float(want_v), rel=1e-15)
    names, seen = sorted(params), {}

    def apply(i, g):
        seen[names[i]] = np.asarray(be.to_numpy(g)).copy()
        if be.streams_gradients:  # the pass no longer reads it: overwrite it, in place
            params[names[i]] = be.add_scaled_(params[names[i]], g, 1e3)

    backward(apply)
    assert sorted(seen) == names
    order = list(seen)
    if be.streams_gradients:
        assert order == ["b", "a", "unused"]  # the last layer first, the unused leaf last
    for k in names:
        np.testing.assert_allclose(seen[k], np.asarray(be.to_numpy(want[k])), rtol=1e-13, atol=0)
    np.testing.assert_array_equal(seen["unused"], np.zeros(2))


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (64,), (65, 3)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rademacher_signs_any_shape(be, shape, dtype):
    r = be.rademacher(be.key(3), shape, dtype=dtype)
    assert tuple(r.shape) == shape and be.dtype_name(r.dtype) == dtype
    assert set(np.unique(be.to_numpy(r))) <= {-1.0, 1.0}


@pytest.mark.parametrize("kind", ["normal", "rademacher"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_draw_rows_blocks_depend_on_their_own_key_only(be, kind, dtype):
    """draw_rows(kind, keys, sizes, R): block j is what keys[j] alone draws (so a leaf's tangent
    can be drawn again on its own, as the lean step does); with R = 1 it is kind(keys[j], (1, size));
    rows are different draws with the distribution's moments."""
    keys = [be.fold_in(be.key(9), i) for i in range(3)]
    sizes = [5, 1, 70000]
    out = be.draw_rows(kind, keys, sizes, 3, dtype=dtype)
    assert tuple(out.shape) == (3, 70006) and be.dtype_name(out.dtype) == dtype
    got = be.to_numpy(out)
    one = be.to_numpy(be.draw_rows(kind, keys, sizes, 1, dtype=dtype))
    draw = getattr(be, kind)
    start = 0
    for key, size in zip(keys, sizes):
        alone = be.to_numpy(be.draw_rows(kind, [key], [size], 3, dtype=dtype))
        np.testing.assert_array_equal(got[:, start : start + size], alone)
        np.testing.assert_array_equal(
            one[:, start : start + size], be.to_numpy(draw(key, (1, size), dtype=dtype))
        )
        start += size
    big = got[:, 6:]
    assert not np.array_equal(big[0], big[1]) and not np.array_equal(big[1], big[2])
    assert abs(big.mean()) < 0.05 and abs(big.std() - 1) < 0.05
    if kind == "rademacher":
        assert set(np.unique(got)) == {-1.0, 1.0}
    assert np.abs(np.corrcoef(big)[~np.eye(3, dtype=bool)]).max() < 0.02  # rows independent (sd 0.004)


def test_draw_rows_rejects_bad_arguments(be):
    with pytest.raises(ValueError, match="kind must be 'normal' or 'rademacher', got 'uniform'"):
        be.draw_rows("uniform", [be.key(0)], [3], 1)
    with pytest.raises(ValueError, match="one key per block: got 1 keys for 2 sizes"):
        be.draw_rows("normal", [be.key(0)], [3, 4], 1)


def test_rademacher_bits_are_balanced_and_independent(be):
    r = be.to_numpy(be.rademacher(be.key(11), (200_000,)))
    assert abs(r.mean()) < 0.01
    # neighbours (within a word and across words) are uncorrelated
    for lag in (1, 8, 31, 32, 63, 64):
        assert abs(np.mean(r[:-lag] * r[lag:])) < 0.01, lag


def test_rademacher_draws_from_different_keys_are_uncorrelated(be):
    """Keys folded from one seed (as a training run makes them) give independent sign vectors:
    the correlation of two draws has standard deviation 1/sqrt(n); every bit position of a
    word is balanced."""
    n, m = 4096, 120
    v = np.stack([np.asarray(be.to_numpy(be.rademacher(be.fold_in(be.key(1), i), (n,)))) for i in range(m)])
    corr = (v @ v.T / n)[~np.eye(m, dtype=bool)]
    sd = 1 / np.sqrt(n)
    assert abs(corr.mean()) < 0.5 * sd and 0.8 * sd < corr.std() < 1.2 * sd
    assert np.abs(corr).max() < 5.5 * sd
    per_bit = v.reshape(m, -1, 32).mean(axis=(0, 1))
    assert np.abs(per_bit).max() < 5 / np.sqrt(m * n / 32)


# ----------------------------------------------------------------------------- torch: autograd fast path


def _torch_or_skip():
    torch = pytest.importorskip("torch")
    return torch, dg.backend("torch")


def test_torch_value_and_grad_plain_autograd_equals_torch_func():
    """Outside torch.func transforms value_and_grad runs torch.autograd (faster); same numbers."""
    torch, bt = _torch_or_skip()
    rng = np.random.default_rng(0)
    params = {
        "w": torch.tensor(rng.normal(size=(3, 4))),
        "b": torch.tensor(rng.normal(size=3)),
        "unused": torch.tensor(rng.normal(size=2)),
    }
    x = torch.tensor(rng.normal(size=(5, 4)))

    def f(p, x):
        h = torch.tanh(x @ p["w"].T + p["b"])
        return (h**2).sum(), {"h": h}

    (v, aux), g = bt.value_and_grad(f, has_aux=True)(params, x)
    gf, (vf, auxf) = torch.func.grad_and_value(f, has_aux=True)(params, x)
    assert float(v) == pytest.approx(float(vf), rel=1e-15)
    for k in params:
        np.testing.assert_allclose(g[k].numpy(), gf[k].numpy(), rtol=1e-13, atol=0)
    assert not v.requires_grad and not aux["h"].requires_grad and not g["w"].requires_grad
    np.testing.assert_array_equal(g["unused"].numpy(), np.zeros(2))  # as torch.func: zeros, not None
    assert not params["w"].requires_grad  # the caller's tensors are left alone
    # a constant function: zero gradients
    v0, g0 = bt.value_and_grad(lambda p: torch.tensor(2.0, dtype=torch.float64))(params)
    assert float(v0) == 2.0 and all(float(t.abs().sum()) == 0 for t in g0.values())
    with pytest.raises(RuntimeError, match="scalar"):
        bt.value_and_grad(lambda p: p["w"] * 2)(params)


def test_torch_value_and_grad_nested_and_transformed_stay_exact():
    """Nested derivatives (grad of grad), vmap and jvp over it go through torch.func."""
    torch, bt = _torch_or_skip()
    x = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)

    def f(z):
        return (torch.sin(z) * z).sum()

    # second derivative by value_and_grad twice: d/dz (sin z + z cos z) = 2 cos z - z sin z
    hess_diag = bt.value_and_grad(lambda z: bt.value_and_grad(f)(z)[1][0])(x)[1]
    expected0 = 2 * np.cos(0.3) - 0.3 * np.sin(0.3)
    assert float(hess_diag[0]) == pytest.approx(expected0, rel=1e-12)
    batched = bt.vmap(lambda z: bt.value_and_grad(f)(z)[1])(torch.stack([x, 2 * x]))
    np.testing.assert_allclose(
        batched[1].numpy(), (torch.sin(2 * x) + 2 * x * torch.cos(2 * x)).numpy(), rtol=1e-12
    )
    # forward-over-reverse: the Hessian-vector product along e_0
    t = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    _, hvp = bt.jvp(lambda z: bt.value_and_grad(f)(z)[1], (x,), (t,))
    assert float(hvp[0]) == pytest.approx(expected0, rel=1e-12)
    # inputs that already require grad (an outer autograd graph): the outer gradient is right
    xr = x.clone().requires_grad_(True)
    inner = bt.value_and_grad(f)(xr)[1].sum()  # sum of first derivatives
    (outer,) = torch.autograd.grad(inner, xr)
    np.testing.assert_allclose(outer.numpy(), (2 * torch.cos(x) - x * torch.sin(x)).numpy(), rtol=1e-12)


# ----------------------------------------------------------------------------- conv weight gradient


def _np_conv_weight_grad(x, gz, w_shape, stride, padding, dilation, groups):
    """sum over n, h, w of gz[n, o, h, w] * xpad[n, group channel c, h*s + i*d, w*s + j*d]."""
    (pt, pb), (pl, pr) = padding
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    out_c, in_c, kh, kw = w_shape
    per = out_c // groups
    ho, wo = gz.shape[2:]
    gw = np.zeros(w_shape)
    for o in range(out_c):
        g = o // per
        for i in range(kh):
            for j in range(kw):
                hs, ws = i * dilation[0], j * dilation[1]
                patch = xp[
                    :,
                    g * in_c : (g + 1) * in_c,
                    hs : hs + stride[0] * (ho - 1) + 1 : stride[0],
                    ws : ws + stride[1] * (wo - 1) + 1 : stride[1],
                ]
                gw[o, :, i, j] = np.einsum("nchw,nhw->c", patch, gz[:, o])
    return gw


@pytest.mark.parametrize(
    "stride, padding, dilation, groups",
    [
        ((1, 1), ((1, 1), (1, 1)), (1, 1), 1),
        ((2, 1), ((0, 1), (2, 0)), (1, 1), 1),  # asymmetric padding ("same" with an even kernel)
        ((1, 2), ((1, 1), (0, 0)), (2, 1), 2),
    ],
)
def test_conv2d_weight_grad_matches_numpy_and_the_vjp(be, stride, padding, dilation, groups):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 9, 8))
    w_shape = (6, 4 // groups, 3, 2)
    w = be.asarray(rng.standard_normal(w_shape), dtype="float64")
    xb = be.asarray(x, dtype="float64")

    def conv(ww):
        return be.conv2d(xb, ww, stride=stride, padding=padding, dilation=dilation, groups=groups)

    out, pullback = be.vjp(conv, w)
    gz = rng.standard_normal(tuple(out.shape))
    got = be.conv2d_weight_grad(
        xb,
        be.asarray(gz, dtype="float64"),
        w_shape,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    assert tuple(got.shape) == w_shape
    want = _np_conv_weight_grad(x, gz, w_shape, stride, padding, dilation, groups)
    np.testing.assert_allclose(be.to_numpy(got), want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        be.to_numpy(got), be.to_numpy(pullback(be.asarray(gz, dtype="float64"))[0]), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("bias", [True, False])
def test_linear_is_x_times_w_transposed_plus_b(be, bias):
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    got = be.linear(be.asarray(x), be.asarray(w), be.asarray(b) if bias else None)
    np.testing.assert_allclose(be.to_numpy(got), x @ w.T + (b if bias else 0), rtol=1e-12, atol=1e-12)
    # and its derivative in w along a tangent is linear(x, tw) (no bias), forward mode
    tw = rng.standard_normal((4, 5))
    _, t = be.jvp(
        lambda ww: be.linear(be.asarray(x), ww, be.asarray(b) if bias else None),
        (be.asarray(w),),
        (be.asarray(tw),),
    )
    np.testing.assert_allclose(be.to_numpy(t), x @ tw.T, rtol=1e-12, atol=1e-12)
    # float32 data with float64 params promotes, as matmul does (duogard's float64 runs on float32 data)
    mixed = be.linear(be.asarray(x, dtype="float32"), be.asarray(w), be.asarray(b) if bias else None)
    assert be.dtype_name(mixed.dtype) == "float64"
    np.testing.assert_allclose(
        be.to_numpy(mixed), x.astype(np.float32) @ w.T + (b if bias else 0), rtol=1e-12
    )


@pytest.mark.parametrize("padding", [((1, 1), (1, 1)), ((0, 1), (2, 0))])  # symmetric; asymmetric
def test_conv2d_bias_is_added_per_channel(be, padding):
    """``conv2d(x, w, b)`` (fused on torch) is the convolution plus b per output channel, in
    value and in its forward-mode derivative; a float32 bias on float64 params promotes."""
    rng = np.random.default_rng(4)
    x, w, b = rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    xb, wb, bb = be.asarray(x), be.asarray(w), be.asarray(b)
    plain = be.to_numpy(be.conv2d(xb, wb, padding=padding))
    got = be.conv2d(xb, wb, bb, padding=padding)
    np.testing.assert_allclose(be.to_numpy(got), plain + b[None, :, None, None], rtol=1e-12, atol=1e-12)
    tw, tb = rng.standard_normal(w.shape), rng.standard_normal(4)
    _, t = be.jvp(
        lambda ww, bias: be.conv2d(xb, ww, bias, padding=padding), (wb, bb), (be.asarray(tw), be.asarray(tb))
    )
    want = be.to_numpy(be.conv2d(xb, be.asarray(tw), padding=padding)) + tb[None, :, None, None]
    np.testing.assert_allclose(be.to_numpy(t), want, rtol=1e-12, atol=1e-12)
    mixed = be.conv2d(xb, wb, be.asarray(b, dtype="float32"), padding=padding)
    assert be.dtype_name(mixed.dtype) == "float64"
    np.testing.assert_allclose(
        be.to_numpy(mixed), plain + b.astype(np.float32)[None, :, None, None], rtol=1e-12
    )


@pytest.mark.parametrize("shape", [(1, 802816), (3, 5), (7,), (2, 3, 64), (1, 10), ()])
def test_jax_native_normal_draws_in_a_fast_shape_with_jax_s_numbers(shape):
    """duogard_jax.normal(generator="native") draws in a 2-D shape of the same size (XLA's CPU
    code draws faster there than in (1, n)) and reshapes: the numbers must be exactly
    jax.random.normal's."""
    jax = pytest.importorskip("jax")
    bj = dg.backend("jax")
    key = jax.random.fold_in(jax.random.PRNGKey(7), 3)
    for dtype in ("float32", "float64"):
        got = bj.normal(key, shape, dtype=dtype, generator="native")
        want = jax.random.normal(key, shape, dtype=bj.as_dtype(dtype))
        assert tuple(got.shape) == shape and got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_threads_for_picks_one_torch_thread_for_small_steps(be, monkeypatch):
    """torch: one intra-op thread below ~1e8 flop per step (a busy neighbour core slowed small
    torch steps many times with two), the default above, DUOGARD_TORCH_THREADS first; JAX: unchanged."""
    if be.name != "torch":
        assert "XLA" in be.threads_for(1e3)
        return
    import torch

    before = torch.get_num_threads()
    try:
        assert be.threads_for(1e6).startswith("torch 1 thread ") and torch.get_num_threads() == 1
        big = be.threads_for(1e12)
        assert torch.get_num_threads() >= 1 and str(torch.get_num_threads()) in big
        monkeypatch.setenv("DUOGARD_TORCH_THREADS", "3")
        assert "DUOGARD_TORCH_THREADS" in be.threads_for(1e6) and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- framework facts


def test_each_backend_reads_its_own_frameworks_facts(both):
    """What the front end once learnt by naming a framework, each backend now says itself."""
    import jax
    import torch

    jx, th = both
    assert th.float64_always is True and jx.float64_always is False
    assert th.gpu_preallocation_fixed() is False and isinstance(jx.gpu_preallocation_fixed(), bool)
    # devices: each backend knows its own device objects, and nothing else
    assert th.exchange_device(torch.device("cpu")) == ("cpu", 0)
    assert th.exchange_device(torch.device("cuda", 1)) == ("cuda", 1)
    assert th.exchange_device(torch.device("meta")) is None
    assert jx.exchange_device(jax.devices("cpu")[0]) == ("cpu", 0)
    for device in ("cpu", 3, None):
        assert th.exchange_device(device) is None and jx.exchange_device(device) is None
    assert jx.exchange_device(torch.device("cpu")) is None
    assert th.exchange_device(jax.devices("cpu")[0]) is None
    # forward-mode failures: each matches its own framework's words; other errors are not its own
    assert "jax.custom_vjp" in jx.forward_mode_cause(TypeError("can't apply forward-mode to a custom_vjp"))
    assert th.forward_mode_cause(TypeError("can't apply forward-mode to a custom_vjp")) == (
        "an op in the loss has no forward-mode (JVP) rule"
    )
    assert "torch.autograd.Function" in th.forward_mode_cause(RuntimeError("implement setup_context"))
    assert jx.forward_mode_cause(RuntimeError("implement setup_context")) is None
    assert "in place" in th.forward_mode_cause(RuntimeError("an inplace operation"))
    for be in both:
        assert be.forward_mode_cause(ValueError("jvp")) is None  # not an error forward mode raises
        assert be.forward_mode_cause(RuntimeError("shapes do not match")) is None
    # collectives
    assert th.is_collective_failure(RuntimeError("[gloo] Connection closed by peer"))
    assert jx.is_collective_failure(RuntimeError("heartbeat timeout"))
    # jaxlib raises gloo's failures as ValueErrors (a peer gone, or one that stalled past the timeout)
    assert jx.is_collective_failure(ValueError("UNKNOWN: Gloo all-reduce failed: Connection reset by peer"))
    assert jx.is_collective_failure(ValueError("UNKNOWN: Gloo all-gather failed: Timed out waiting 8000ms"))
    for be in both:
        assert not be.is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
        assert not be.is_collective_failure(ValueError("timeout"))
