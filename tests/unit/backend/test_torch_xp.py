"""The torch backend's Array API namespace: each function sent straight to torch gives
array_api_compat's result (values, dtype, shape) on the calls it takes and the calls it passes
on, and every other name is array_api_compat's."""

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
compat = pytest.importorskip("array_api_compat.torch")
from duogard_torch._xp import xp  # noqa: E402


def _same(got, want):
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, (got, want)
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    else:
        assert got == want


def _arrays():
    g = torch.Generator().manual_seed(0)
    f32 = torch.randn((3, 4, 5), generator=g)
    return {
        "f32": f32,
        "f64": f32.double(),
        "f16": f32.half(),
        "i32": torch.randint(-5, 5, (3, 4, 5), generator=g, dtype=torch.int32),
        "i64": torch.randint(-5, 5, (3, 4, 5), generator=g),
        "bool": f32 > 0,
        "uint8": torch.randint(0, 200, (3, 4, 5), generator=g, dtype=torch.uint8),
    }


BINARY = ["add", "subtract", "multiply", "divide", "maximum", "minimum", "equal", "not_equal", "greater"]
BINARY += ["greater_equal", "less", "less_equal", "logical_and", "logical_or"]


@pytest.mark.parametrize("name", BINARY)
def test_binary_ops_are_array_api_compats(name):
    a = _arrays()
    cases = [(a["f32"], a["f32"] + 1), (a["f64"], a["f64"]), (a["i32"], a["i32"] + 1), (a["bool"], a["bool"])]
    cases += [
        (a["f32"], a["f64"]),
        (a["i32"], a["i64"]),
        (a["f32"], 2.0),
        (3, a["i64"]),
        (a["f32"][0], a["f32"]),
    ]
    for x1, x2 in cases:
        if name in ("logical_and", "logical_or"):
            x1, x2 = (v.bool() if isinstance(v, torch.Tensor) else bool(v) for v in (x1, x2))
        try:
            want = getattr(compat, name)(x1, x2)
        except (TypeError, RuntimeError) as exc:
            with pytest.raises(type(exc)):
                getattr(xp, name)(x1, x2)
            continue
        _same(getattr(xp, name)(x1, x2), want)


def test_matmul_transpose_reshape_astype_expand_dims_where():
    a = _arrays()
    m = a["f32"]
    _same(xp.matmul(m, compat.matrix_transpose(m)), compat.matmul(m, compat.matrix_transpose(m)))
    _same(xp.matmul(m[0], m[0].double().T), compat.matmul(m[0], m[0].double().T))  # promotion
    for x in (m, m[0], a["i64"]):
        _same(xp.matrix_transpose(x), compat.matrix_transpose(x))
    for shape in ((60,), (-1, 5), (3, 20), (1, 60, 1)):
        _same(xp.reshape(m, shape), compat.reshape(m, shape))
    _same(xp.reshape(m, (60,), copy=True), compat.reshape(m, (60,), copy=True))
    assert xp.reshape(m, (60,), copy=True).data_ptr() != m.data_ptr()
    for key, dtype in itertools.product(
        a, (torch.float32, torch.float64, torch.int64, torch.bool, torch.float16)
    ):
        _same(xp.astype(a[key], dtype), compat.astype(a[key], dtype))
    same = xp.astype(m, torch.float32)  # the standard's copy=True: a copy even of the same dtype
    assert same is not m and same.data_ptr() != m.data_ptr()
    _same(xp.astype(m, torch.float32, copy=False), compat.astype(m, torch.float32, copy=False))
    for axis in (-4, -1, 0, 1, 3):
        _same(xp.expand_dims(m, axis=axis), compat.expand_dims(m, axis=axis))
    with pytest.raises((IndexError, ValueError)):
        xp.expand_dims(m, axis=4)
    c = a["bool"]
    for x1, x2 in ((m, m + 1), (m, a["f64"]), (a["i32"], a["i64"]), (m, 0.0)):
        _same(xp.where(c, x1, x2), compat.where(c, x1, x2))
    _same(xp.where(a["i32"] > 0, m, m), compat.where(a["i32"] > 0, m, m))


@pytest.mark.parametrize("fn", ["sum", "mean"])
def test_reductions_are_array_api_compats(fn):
    a = _arrays()
    axes = [None, 0, -1, 2, (0, 2), (1,), (-1, 0), ()]
    for key in ("f32", "f64", "f16", "i32", "i64", "bool", "uint8"):
        for axis, keepdims in itertools.product(axes, (False, True)):
            x = a[key]
            try:
                want = getattr(compat, fn)(x, axis=axis, keepdims=keepdims)
            except (TypeError, RuntimeError) as exc:
                with pytest.raises(type(exc)):
                    getattr(xp, fn)(x, axis=axis, keepdims=keepdims)
                continue
            got = getattr(xp, fn)(x, axis=axis, keepdims=keepdims)
            assert got.dtype == want.dtype and got.shape == want.shape, (key, axis, keepdims)
            np.testing.assert_allclose(
                got.double().numpy(), want.double().numpy(), rtol=1e-6, err_msg=f"{key} {axis}"
            )
    _same(xp.sum(a["f32"], axis=1, dtype=torch.float64), compat.sum(a["f32"], axis=1, dtype=torch.float64))


def test_every_other_name_is_array_api_compats():
    for name in ("exp", "log", "arange", "zeros", "isdtype", "float32", "stack", "concat", "max", "linalg"):
        assert getattr(xp, name) is getattr(compat, name)
    with pytest.raises(AttributeError):
        xp.no_such_function  # noqa: B018
    import duogard as dg

    assert dg.backend("torch").xp is xp
