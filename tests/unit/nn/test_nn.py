"""Layers and activations (duogard.nn) on both backends, against torch.nn, NumPy/SciPy formulas and
each other: forward values, gradients through each backend's own autodiff, initialisation, errors.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
scipy_special = pytest.importorskip("scipy.special")

import torch.nn.functional as F  # noqa: E402

import duogard as dg  # noqa: E402
from duogard import nn  # noqa: E402
from duogard.tree import flatten_dict, unflatten_dict  # noqa: E402

from helpers import TOL, to_backend, to_numpy  # noqa: E402

tnn = torch.nn
DTYPES = ("float32", "float64")
# torch's own note that padding="same" with an even kernel copies the input (the reference's cost)
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


def assert_close(actual, expected, dtype, **override):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), **{**TOL[dtype], **override})


def load_torch(module, params, dtype):
    """``module`` in ``dtype`` with duogard's params loaded by their flat (state_dict) names."""
    module = module.to(getattr(torch, dtype))
    state = {k: torch.as_tensor(np.array(v)) for k, v in flatten_dict(params).items()}
    assert sorted(state) == sorted(module.state_dict()), "flat param names differ from torch's"
    for k, v in module.state_dict().items():
        assert tuple(v.shape) == tuple(state[k].shape), k
    module.load_state_dict(state, strict=True)
    return module.eval()


# ----------------------------------------------------------------------------- layer cases
# id -> (duogard layer, torch module from the input shape, input shape, randomise params?)


def _mixed_cnn():
    model = nn.Sequential(
        nn.Conv2d(4, 3, padding="same"),
        nn.relu,
        nn.MaxPool2d(2),
        nn.Conv2d(4, 3, padding=1, groups=2, bias=False),
        nn.activation("leaky_relu", negative_slope=0.1),
        nn.AvgPool2d(2, padding=1, count_include_pad=False),
        nn.Flatten(),
        nn.LayerNorm(),
        nn.Linear(5),
        nn.gelu,
        nn.Dropout(0.5),
        nn.Linear(3),
        nn.log_softmax,
    )
    ref = lambda s: tnn.Sequential(  # noqa: E731  (input (2, 3, 8, 8) -> flat 4 * 3 * 3)
        tnn.Conv2d(s[1], 4, 3, padding="same"),
        tnn.ReLU(),
        tnn.MaxPool2d(2),
        tnn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False),
        tnn.LeakyReLU(0.1),
        tnn.AvgPool2d(2, padding=1, count_include_pad=False),
        tnn.Flatten(),
        tnn.LayerNorm(36),
        tnn.Linear(36, 5),
        tnn.GELU(),
        tnn.Dropout(0.5),
        tnn.Linear(5, 3),
        tnn.LogSoftmax(dim=-1),
    )
    return model, ref


LAYERS = {
    "linear": (nn.Linear(5), lambda s: tnn.Linear(s[-1], 5), (3, 4), False),
    "linear_nobias_3d": (
        nn.Linear(5, bias=False),
        lambda s: tnn.Linear(s[-1], 5, bias=False),
        (2, 3, 4),
        False,
    ),
    "conv": (nn.Conv2d(4, 3), lambda s: tnn.Conv2d(s[1], 4, 3), (2, 3, 7, 6), False),
    "conv_stride_pad_int": (
        nn.Conv2d(4, (3, 2), stride=2, padding=1),
        lambda s: tnn.Conv2d(s[1], 4, (3, 2), stride=2, padding=1),
        (2, 3, 7, 6),
        False,
    ),
    "conv_stride_pad_pair": (
        nn.Conv2d(2, 3, stride=(1, 2), padding=(2, 0)),
        lambda s: tnn.Conv2d(s[1], 2, 3, stride=(1, 2), padding=(2, 0)),
        (1, 2, 6, 7),
        False,
    ),
    "conv_same_odd": (
        nn.Conv2d(3, 3, padding="same"),
        lambda s: tnn.Conv2d(s[1], 3, 3, padding="same"),
        (2, 2, 5, 6),
        False,
    ),
    "conv_same_even_dilated": (
        nn.Conv2d(3, (4, 2), padding="same", dilation=(1, 2)),
        lambda s: tnn.Conv2d(s[1], 3, (4, 2), padding="same", dilation=(1, 2)),
        (1, 2, 6, 7),
        False,
    ),
    "conv_valid": (
        nn.Conv2d(3, 2, padding="valid"),
        lambda s: tnn.Conv2d(s[1], 3, 2, padding="valid"),
        (2, 2, 4, 5),
        False,
    ),
    "conv_dilation": (
        nn.Conv2d(2, 3, dilation=2, padding=(1, 2)),
        lambda s: tnn.Conv2d(s[1], 2, 3, dilation=2, padding=(1, 2)),
        (1, 3, 7, 7),
        False,
    ),
    "conv_groups": (
        nn.Conv2d(4, 3, groups=2, padding=1),
        lambda s: tnn.Conv2d(s[1], 4, 3, groups=2, padding=1),
        (2, 6, 5, 5),
        False,
    ),
    "conv_depthwise_nobias": (
        nn.Conv2d(6, 3, groups=3, bias=False),
        lambda s: tnn.Conv2d(s[1], 6, 3, groups=3, bias=False),
        (2, 3, 5, 5),
        False,
    ),
    "maxpool": (nn.MaxPool2d(2), lambda s: tnn.MaxPool2d(2), (2, 3, 6, 5), False),
    "maxpool_stride_pad": (
        nn.MaxPool2d(3, stride=2, padding=1),
        lambda s: tnn.MaxPool2d(3, 2, 1),
        (2, 2, 7, 6),
        False,
    ),
    "maxpool_pairs": (
        nn.MaxPool2d((2, 3), stride=(1, 2), padding=(1, 0)),
        lambda s: tnn.MaxPool2d((2, 3), (1, 2), (1, 0)),
        (1, 2, 5, 7),
        False,
    ),
    "avgpool": (nn.AvgPool2d(2), lambda s: tnn.AvgPool2d(2), (2, 3, 6, 5), False),
    "avgpool_pad_incl": (
        nn.AvgPool2d(3, stride=2, padding=1),
        lambda s: tnn.AvgPool2d(3, 2, 1),
        (2, 2, 7, 6),
        False,
    ),
    "avgpool_pad_excl": (
        nn.AvgPool2d((3, 2), stride=(2, 1), padding=1, count_include_pad=False),
        lambda s: tnn.AvgPool2d((3, 2), (2, 1), 1, count_include_pad=False),
        (2, 2, 7, 6),
        False,
    ),
    "flatten": (nn.Flatten(), lambda s: tnn.Flatten(), (2, 3, 4, 2), False),
    "flatten_from_2": (nn.Flatten(2), lambda s: tnn.Flatten(2), (2, 3, 4, 2), False),
    "flatten_all": (nn.Flatten(0), lambda s: tnn.Flatten(0), (2, 3, 4), False),
    "layernorm_1d": (nn.LayerNorm(), lambda s: tnn.LayerNorm(s[-1]), (3, 5), True),
    "layernorm_2d": (
        nn.LayerNorm(2, eps=1e-3),
        lambda s: tnn.LayerNorm(s[-2:], eps=1e-3),
        (2, 3, 4, 5),
        True,
    ),
    "layernorm_noaffine": (
        nn.LayerNorm(elementwise_affine=False),
        lambda s: tnn.LayerNorm(s[-1], elementwise_affine=False),
        (3, 6),
        False,
    ),
    "dropout_eval": (nn.Dropout(0.5), lambda s: tnn.Dropout(0.5), (3, 4), False),
    "sequential_mlp": (
        nn.Sequential(nn.Linear(6), nn.tanh, nn.Linear(4, bias=False), nn.relu, nn.Linear(2)),
        lambda s: tnn.Sequential(
            tnn.Linear(s[-1], 6), tnn.Tanh(), tnn.Linear(6, 4, bias=False), tnn.ReLU(), tnn.Linear(4, 2)
        ),
        (5, 3),
        False,
    ),
    "sequential_cnn": (*_mixed_cnn(), (2, 3, 8, 8), True),
}


def make_case(name, dtype, seed=0):
    """(duogard layer, NumPy params, torch module with them, NumPy input) for a LAYERS case."""
    layer, make_ref, shape, randomise = LAYERS[name]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    params = layer.init(seed, x)
    if randomise:  # e.g. LayerNorm starts at weight 1, bias 0: make the affine part visible
        params = {
            k: v + 0.3 * rng.standard_normal(v.shape).astype(dtype) for k, v in flatten_dict(params).items()
        }
        params = unflatten_dict(params)
    return layer, params, load_torch(make_ref(shape), params, dtype), x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_forward_matches_torch(be, name, dtype):
    layer, params, ref, x = make_case(name, dtype)
    out = layer.apply(to_backend(be, params), be.asarray(x))
    assert be.dtype_name(out.dtype) == dtype
    expected = ref(torch.as_tensor(x)).detach().numpy()
    assert tuple(out.shape) == expected.shape == layer.output_shape(x.shape)
    assert_close(be.to_numpy(out), expected, dtype)


def _weights(layer, x):
    """Fixed random output weights: the scalar function is sum(layer(x) * w)."""
    return np.random.default_rng(1).standard_normal(layer.output_shape(x.shape)).astype(x.dtype)


@functools.cache
def layer_grads(backend_name, name, dtype):
    """Value and gradients (w.r.t. params and input) of sum(layer(x) * w) through the backend's
    own autodiff, jitted where the backend compiles by default (cached: several tests use them)."""
    be = dg.backend(backend_name)
    layer, params, _, x = make_case(name, dtype)
    wb = be.asarray(_weights(layer, x))

    def f(p, xx):
        return be.xp.sum(layer.apply(p, xx) * wb)

    value, (gp, gx) = be.jit(be.value_and_grad(f, argnums=(0, 1)))(to_backend(be, params), be.asarray(x))
    return float(value), flatten_dict(to_numpy(be, gp)), be.to_numpy(gx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_grad_matches_torch_autograd(be, name, dtype):
    layer, params, ref, x = make_case(name, dtype)
    w = torch.as_tensor(_weights(layer, x))
    value, gp, gx = layer_grads(be.name, name, dtype)
    tx = torch.tensor(x, requires_grad=True)
    ref_value = (ref(tx) * w).sum()
    ref_value.backward()
    ref_gp = {k: p.grad.numpy() for k, p in ref.named_parameters()}
    assert value == pytest.approx(ref_value.item(), rel=1e-5)
    assert sorted(gp) == sorted(ref_gp) == sorted(flatten_dict(params))
    for k in gp:
        assert gp[k].dtype == np.dtype(dtype)
        assert_close(gp[k], ref_gp[k], dtype, atol=10 * TOL[dtype]["atol"])
    assert_close(gx, tx.grad.numpy(), dtype, atol=10 * TOL[dtype]["atol"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_grad_agrees_between_backends(both, name, dtype):
    (vj, gpj, gxj), (vt, gpt, gxt) = (layer_grads(be.name, name, dtype) for be in both)
    assert vj == pytest.approx(vt, rel=10 * TOL[dtype]["rtol"])
    assert sorted(gpj) == sorted(gpt)
    for k in gpj:
        assert_close(gpj[k], gpt[k], dtype, atol=10 * TOL[dtype]["atol"])
    assert_close(gxj, gxt, dtype, atol=10 * TOL[dtype]["atol"])


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_jvp_matches_grad(be, name):
    """Forward mode (the forward gradient's JVP) through every layer: jvp . v == <grad, v>."""
    layer, params, _, x = make_case(name, "float64")
    _, gp, gx = layer_grads(be.name, name, "float64")
    rng = np.random.default_rng(6)
    vp = {k: rng.standard_normal(v.shape) for k, v in gp.items()}
    vx = rng.standard_normal(x.shape)
    wb = be.asarray(_weights(layer, x))

    def f(p, xx):
        return be.xp.sum(layer.apply(p, xx) * wb)

    value, tangent = be.jit(lambda p, xx, tp, tx: be.jvp(f, (p, xx), (tp, tx)))(
        to_backend(be, params), be.asarray(x), to_backend(be, unflatten_dict(vp)), be.asarray(vx)
    )
    expected = sum(float(np.sum(gp[k] * vp[k])) for k in gp) + float(np.sum(gx * vx))
    assert float(tangent) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert float(value) == pytest.approx(layer_grads(be.name, name, "float64")[0], rel=1e-12)


def test_sequential_under_jit_and_vmap(be):
    model = nn.Sequential(nn.Conv2d(2, 3, padding=1), nn.relu, nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3))
    x = np.random.default_rng(0).standard_normal((3, 2, 4, 4))
    p = to_backend(be, model.init(0, x))
    eager = be.to_numpy(model.apply(p, be.asarray(x)))
    jitted = be.jit(lambda pp, xx: model.apply(pp, xx))
    assert_close(be.to_numpy(jitted(p, be.asarray(x))), eager, "float64")
    per_example = be.vmap(lambda xx: model.apply(p, xx[None])[0])(be.asarray(x))
    assert_close(be.to_numpy(per_example), eager, "float64")


def test_linear_matches_numpy_formula(be):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3))
    layer = nn.Linear(2)
    p = layer.init(0, x)
    out = be.to_numpy(layer.apply(to_backend(be, p), be.asarray(x)))
    assert_close(out, x @ p["weight"].T + p["bias"], "float64")
    p = nn.Linear(2, bias=False).init(0, x)
    assert set(p) == {"weight"}
    out = be.to_numpy(nn.Linear(2, bias=False).apply(to_backend(be, p), be.asarray(x)))
    assert_close(out, x @ p["weight"].T, "float64")


def test_conv_same_keeps_spatial_size_and_groups_shape(be):
    x = np.random.default_rng(0).standard_normal((1, 4, 5, 6))
    for k in (1, 2, 3, 4):
        layer = nn.Conv2d(2, k, padding="same")
        p = layer.init(0, x)
        assert tuple(layer.apply(to_backend(be, p), be.asarray(x)).shape) == (1, 2, 5, 6)
    p = nn.Conv2d(6, 3, groups=2).init(0, x)
    assert p["weight"].shape == (6, 2, 3, 3)


# ----------------------------------------------------------------------------- dropout


def test_dropout_is_identity_when_not_training(be):
    x = be.asarray(np.random.default_rng(0).standard_normal((4, 5)))
    d = nn.Dropout(0.5)
    assert np.array_equal(be.to_numpy(d.apply({}, x)), be.to_numpy(x))
    assert np.array_equal(be.to_numpy(d.apply({}, x, key=be.key(0))), be.to_numpy(x))
    assert np.array_equal(be.to_numpy(nn.Dropout(0.0).apply({}, x, train=True)), be.to_numpy(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", (0.2, 0.7))
def test_dropout_training(be, p, dtype):
    x = be.asarray(np.full((100, 100), 2.0, dtype))
    d = nn.Dropout(p)
    out = d.apply({}, x, key=be.key(0), train=True)
    assert be.dtype_name(out.dtype) == dtype
    y = be.to_numpy(out)
    zeros = y == 0
    assert abs(zeros.mean() - p) < 0.025  # 10^4 draws: 5 standard deviations
    np.testing.assert_allclose(y[~zeros], 2.0 / (1.0 - p), rtol=1e-6)
    again = be.to_numpy(d.apply({}, x, key=be.key(0), train=True))
    assert np.array_equal(y, again)
    other = be.to_numpy(d.apply({}, x, key=be.key(1), train=True))
    assert not np.array_equal(y, other)


def test_dropout_training_needs_a_key(be):
    x = be.asarray(np.ones((2, 3)))
    with pytest.raises(ValueError, match="Dropout.*key"):
        nn.Dropout(0.5).apply({}, x, train=True)
    model = nn.Sequential(nn.Linear(2), nn.Dropout(0.5))
    with pytest.raises(ValueError, match="Dropout.*key"):
        model.apply(to_backend(be, model.init(0, x)), x, train=True)


def test_dropout_gradient_and_sequential_keys(be):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((20, 10)), rng.standard_normal((20, 10))
    d, k = nn.Dropout(0.4), be.key(5)
    out = be.to_numpy(d.apply({}, be.asarray(x), key=k, train=True))
    wb = be.asarray(w)
    _, g = be.jit(be.value_and_grad(lambda xx: be.xp.sum(d.apply({}, xx, key=k, train=True) * wb)))(
        be.asarray(x)
    )
    assert_close(be.to_numpy(g), (out != 0) * w / 0.6, "float64")
    # Sequential folds the key per layer: deterministic for a key, and two Dropouts draw different masks
    model = nn.Sequential(nn.Dropout(0.5), nn.Dropout(0.5))
    ones = be.asarray(np.ones((50, 40)))
    a = be.to_numpy(model.apply({}, ones, key=k, train=True))
    assert np.array_equal(a, be.to_numpy(model.apply({}, ones, key=k, train=True)))
    assert abs((a == 0).mean() - 0.75) < 0.04  # two independent masks keep 1/4
    np.testing.assert_allclose(a[a != 0], 4.0)


# ----------------------------------------------------------------------------- activations
# case -> (name, options, torch function, NumPy/SciPy formula)

_erf, _expit = scipy_special.erf, scipy_special.expit
ACTS = {
    "relu": ("relu", {}, F.relu, lambda x: np.maximum(x, 0)),
    "leaky_relu": ("leaky_relu", {}, F.leaky_relu, lambda x: np.where(x > 0, x, 0.01 * x)),
    "leaky_relu_0.2": (
        "leaky_relu",
        {"negative_slope": 0.2},
        lambda x: F.leaky_relu(x, 0.2),
        lambda x: np.where(x > 0, x, 0.2 * x),
    ),
    "tanh": ("tanh", {}, torch.tanh, np.tanh),
    "sigmoid": ("sigmoid", {}, torch.sigmoid, _expit),
    "gelu": ("gelu", {}, F.gelu, lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2)))),
    "gelu_approx": (
        "gelu",
        {"approximate": True},
        lambda x: F.gelu(x, approximate="tanh"),
        lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    ),
    "softplus": ("softplus", {}, F.softplus, lambda x: np.where(x > 20, x, np.logaddexp(0, x))),
    "softplus_beta_threshold": (
        "softplus",
        {"beta": 2.0, "threshold": 3.0},
        lambda x: F.softplus(x, beta=2.0, threshold=3.0),
        lambda x: np.where(2 * x > 3, x, np.logaddexp(0, 2 * x) / 2),
    ),
    "elu": ("elu", {}, F.elu, lambda x: np.where(x > 0, x, np.expm1(x))),
    "elu_0.5": (
        "elu",
        {"alpha": 0.5},
        lambda x: F.elu(x, 0.5),
        lambda x: np.where(x > 0, x, 0.5 * np.expm1(x)),
    ),
    "silu": ("silu", {}, F.silu, lambda x: x * _expit(x)),
    "softmax": ("softmax", {}, lambda x: torch.softmax(x, -1), lambda x: scipy_special.softmax(x, axis=-1)),
    "softmax_axis0": (
        "softmax",
        {"axis": 0},
        lambda x: torch.softmax(x, 0),
        lambda x: scipy_special.softmax(x, axis=0),
    ),
    "log_softmax": (
        "log_softmax",
        {},
        lambda x: torch.log_softmax(x, -1),
        lambda x: scipy_special.log_softmax(x, axis=-1),
    ),
}


def _act_input(dtype):
    rng = np.random.default_rng(0)
    x = 3 * rng.standard_normal((4, 6))
    x[0, :] = [-30.0, -5.0, 1.4, 1.6, 12.0, 30.0]  # saturation, both sides of softplus's threshold
    x[1, :2] = 0.0  # the kink of relu / leaky_relu / elu: the gradient there must be torch's
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(ACTS))
def test_activation_matches_torch_and_formula(be, case, dtype):
    name, options, torch_fn, formula = ACTS[case]
    x = _act_input(dtype)
    xb = be.asarray(x)
    expected = torch_fn(torch.as_tensor(x)).numpy()
    outs = [
        nn.activation(name, **options)(xb),  # called directly ...
        getattr(nn, name)(xb, **options),
        nn.Sequential(nn.activation(name, **options)).apply({}, xb),
    ]  # ... and as a layer
    if not options:
        outs.append(getattr(nn, name)(xb))
        outs.append(nn.Sequential(getattr(nn, name)).apply({}, xb))
    for out in outs:
        assert be.dtype_name(out.dtype) == dtype
        assert_close(be.to_numpy(out), expected, dtype)
        assert_close(be.to_numpy(out), formula(x.astype(np.float64)), dtype)
    # after a Linear that selects x[:, :3], as torch.nn.Sequential(Linear, activation) would
    lin = {"0": {"weight": be.asarray(np.eye(3, 6, dtype=dtype)), "bias": be.asarray(np.zeros(3, dtype))}}
    out = nn.Sequential(nn.Linear(3), nn.activation(name, **options)).apply(lin, xb)
    assert_close(be.to_numpy(out), torch_fn(torch.as_tensor(x[:, :3])).numpy(), dtype)


@pytest.mark.parametrize("case", sorted(ACTS))
def test_activation_grad_matches_torch(be, case):
    name, options, torch_fn, _ = ACTS[case]
    x = _act_input("float64")
    w = np.random.default_rng(1).standard_normal(x.shape)
    act = nn.activation(name, **options)
    _, g = be.value_and_grad(lambda xx: be.xp.sum(act(xx) * be.asarray(w)))(be.asarray(x))
    tx = torch.tensor(x, requires_grad=True)
    (torch_fn(tx) * torch.as_tensor(w)).sum().backward()
    assert_close(be.to_numpy(g), tx.grad.numpy(), "float64")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(ACTS))
def test_activation_grad_agrees_between_backends(both, case, dtype):
    name, options, _, _ = ACTS[case]
    x = _act_input(dtype)
    act = nn.activation(name, **options)
    grads = [
        be.to_numpy(be.value_and_grad(lambda xx, be=be: be.xp.sum(act(xx) * xx))(be.asarray(x))[1])
        for be in both
    ]
    # absolute tolerance on the gradients' scale: float32 gelu's tanh form cancels near x = -5
    assert_close(grads[0], grads[1], dtype, atol=TOL[dtype]["atol"] * np.abs(grads[1]).max())


def test_activation_names_and_repr():
    assert set(nn.ACTIVATIONS) == {
        "relu",
        "leaky_relu",
        "tanh",
        "sigmoid",
        "gelu",
        "softplus",
        "elu",
        "silu",
        "softmax",
        "log_softmax",
    }
    assert "negative_slope=0.2" in repr(nn.activation("leaky_relu", negative_slope=0.2))


# ----------------------------------------------------------------------------- initialisation

INIT_MODELS = {
    "mlp": (nn.Sequential(nn.Linear(7), nn.relu, nn.Linear(3)), (4, 5)),
    "cnn": (
        nn.Sequential(
            nn.Conv2d(4, 3, groups=2), nn.relu, nn.MaxPool2d(2), nn.Flatten(), nn.LayerNorm(), nn.Linear(3)
        ),
        (2, 2, 6, 6),
    ),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(INIT_MODELS))
def test_init_is_bitwise_identical_across_backends(both, name, dtype):
    model, shape = INIT_MODELS[name]
    params = model.init(0, np.zeros(shape, dtype))
    flat = flatten_dict(params)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.dtype(dtype) for v in flat.values())
    back = [flatten_dict(to_numpy(be, to_backend(be, params))) for be in both]
    for b in back:
        assert sorted(b) == sorted(flat)
        assert all(np.array_equal(b[k], flat[k]) and b[k].dtype == flat[k].dtype for k in flat)
    # and the same model initialised from each backend's own example array gives the same bits
    from_be = [flatten_dict(model.init(0, be.asarray(np.zeros(shape, dtype)))) for be in both]
    for f in from_be:
        assert all(np.array_equal(f[k], flat[k]) and f[k].dtype == flat[k].dtype for k in flat)


@pytest.mark.parametrize("name", sorted(INIT_MODELS))
def test_init_is_deterministic_per_seed(name):
    model, shape = INIT_MODELS[name]
    a, b, c = (flatten_dict(model.init(s, shape)) for s in (0, 0, 1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(not np.array_equal(a[k], c[k]) for k in a if "norm" not in k and a[k].std() > 0)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    gen = flatten_dict(model.init(np.random.default_rng(0), shape))
    assert sorted(gen) == sorted(a)


@pytest.mark.parametrize(
    "layer, shape, fan_in",
    [
        (nn.Linear(300), (2, 40), 40),
        (nn.Conv2d(30, (3, 2)), (1, 5, 6, 6), 5 * 3 * 2),
        (nn.Conv2d(40, 3, groups=4), (1, 8, 6, 6), 2 * 3 * 3),
    ],
)
def test_init_follows_torch_default_bounds(layer, shape, fan_in):
    p = layer.init(0, shape)
    bound = 1 / math.sqrt(fan_in)
    for name, v in p.items():
        assert np.abs(v).max() <= bound, name
    w = p["weight"]
    assert np.abs(w).max() > 0.95 * bound  # uniform over the whole interval ...
    assert abs(w.std() - bound / math.sqrt(3)) < 0.1 * bound  # ... with a uniform's spread
    assert abs(w.mean()) < 0.1 * bound
    # torch's own default init has the same bound
    ref = (
        tnn.Linear(shape[-1], 300)
        if isinstance(layer, nn.Linear)
        else tnn.Conv2d(shape[1], layer.out_channels, layer.kernel_size, groups=layer.groups)
    )
    ref_max = float(ref.weight.detach().abs().max())
    assert 0.95 * bound < ref_max <= bound + 1e-7


def test_layernorm_init_matches_torch():
    p = nn.LayerNorm(2).init(0, (3, 4, 5))
    ref = tnn.LayerNorm((4, 5))
    assert sorted(p) == sorted(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert np.array_equal(p[k], v.numpy())


def test_init_infers_input_sizes_from_shape_or_array(be):
    model = nn.Sequential(nn.Linear(5), nn.relu, nn.Linear(2))
    from_shape = model.init(0, (3, 7))
    from_list = model.init(0, [3, 7])
    from_numpy = model.init(0, np.zeros((3, 7), np.float32))
    from_backend = model.init(0, be.asarray(np.zeros((3, 7), np.float32)))
    for p in (from_list, from_numpy, from_backend):
        assert all(
            np.array_equal(a, b) for a, b in zip(flatten_dict(p).values(), flatten_dict(from_shape).values())
        )
    assert from_shape["0"]["weight"].shape == (5, 7) and from_shape["2"]["weight"].shape == (2, 5)
    assert from_shape["0"]["weight"].dtype == np.float32  # a shape gives float32 ...
    assert (
        model.init(0, be.asarray(np.zeros((3, 7))))["0"]["weight"].dtype == np.float64
    )  # ... an array its dtype
    assert model.init(0, (3, 7), dtype="float64")["0"]["weight"].dtype == np.float64
    assert model.init(0, np.zeros((3, 7), np.int64))["0"]["weight"].dtype == np.float32
    assert model.output_shape((3, 7)) == (3, 2)
    assert model.layer_shapes((3, 7)) == [(3, 5), (3, 5), (3, 2)]
    assert nn.Conv2d(4, 3, stride=2).output_shape((1, 2, 9, 8)) == (1, 4, 4, 3)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv2d(4, 3), (2, 3, 5)),
        (nn.MaxPool2d(2), (3, 5, 5)),
        (nn.AvgPool2d(2), (1, 2, 3, 5, 5)),
    ],
)
def test_wrong_rank_names_layer_and_shapes(be, layer, shape):
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{name}.*rank-4.*{re_shape(shape)}"):
        layer.init(0, shape)
    p = layer.init(0, (2, 3, 6, 6))
    with pytest.raises(ValueError, match=rf"{name}.*rank-4.*{re_shape(shape)}"):
        layer.apply(to_backend(be, p), be.asarray(np.zeros(shape)))


def re_shape(shape):
    import re

    return re.escape(str(tuple(shape)))


def test_channel_and_feature_mismatch_at_apply(be):
    conv = nn.Conv2d(4, 3)
    p = to_backend(be, conv.init(0, (1, 3, 6, 6)))
    with pytest.raises(ValueError, match=rf"Conv2d.*expected 3 input channels.*{re_shape((1, 4, 6, 6))}"):
        conv.apply(p, be.asarray(np.zeros((1, 4, 6, 6), np.float32)))
    lin = nn.Linear(2)
    p = to_backend(be, lin.init(0, (5, 4)))
    with pytest.raises(ValueError, match=rf"Linear.*\(\.\.\., 4\).*{re_shape((5, 3))}"):
        lin.apply(p, be.asarray(np.zeros((5, 3), np.float32)))
    ln = nn.LayerNorm(2)
    p = to_backend(be, ln.init(0, (2, 3, 4)))
    with pytest.raises(ValueError, match=rf"LayerNorm.*3, 4.*{re_shape((2, 4, 3))}"):
        ln.apply(p, be.asarray(np.zeros((2, 4, 3))))


def test_init_time_shape_errors():
    with pytest.raises(ValueError, match=r"Conv2d.*divisible by groups.*\(1, 3, 6, 6\)"):
        nn.Conv2d(4, 3, groups=2).init(0, (1, 3, 6, 6))
    with pytest.raises(ValueError, match=r"Conv2d.*\(1, 1, 2, 2\).*too small"):
        nn.Conv2d(2, 3).init(0, (1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"MaxPool2d.*\(1, 1, 1, 1\)"):
        nn.MaxPool2d(2).init(0, (1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"LayerNorm.*rank >= 2.*\(4,\)"):
        nn.LayerNorm(2).init(0, (4,))
    with pytest.raises(ValueError, match=r"Flatten.*start_dim 3.*\(2, 3\)"):
        nn.Flatten(3).init(0, (2, 3))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: nn.Linear(0), r"Linear: out_features must be a positive int, got 0"),
        (lambda: nn.Linear(-2), r"Linear: out_features.*-2"),
        (lambda: nn.Linear(2.5), r"Linear: out_features.*2\.5"),
        (lambda: nn.Conv2d(-1, 3), r"Conv2d: out_channels.*-1"),
        (lambda: nn.Conv2d(3, 0), r"Conv2d: kernel_size.*0"),
        (lambda: nn.Conv2d(3, (3, 3, 3)), r"Conv2d: kernel_size.*\(3, 3, 3\)"),
        (lambda: nn.Conv2d(3, 3, stride=0), r"Conv2d: stride"),
        (lambda: nn.Conv2d(3, 3, padding=-1), r"Conv2d: padding.*-1"),
        (lambda: nn.Conv2d(3, 3, padding="full"), r"Conv2d: padding must be .*'same'.*'valid'.*'full'"),
        (lambda: nn.Conv2d(3, 3, padding="same", stride=2), r"Conv2d: padding='same' needs stride 1"),
        (lambda: nn.Conv2d(3, 3, groups=2), r"Conv2d: out_channels \(3\).*groups \(2\)"),
        (lambda: nn.Conv2d(4, 3, groups=0), r"Conv2d: groups"),
        (lambda: nn.MaxPool2d(0), r"MaxPool2d: kernel_size"),
        (lambda: nn.AvgPool2d(2, padding=2), r"AvgPool2d: padding \(2, 2\).*half the kernel"),
        (lambda: nn.Dropout(1.0), r"Dropout: p must be in \[0, 1\), got 1\.0"),
        (lambda: nn.Dropout(-0.1), r"Dropout: p"),
        (lambda: nn.LayerNorm(0), r"LayerNorm: normalized_ndim"),
        (lambda: nn.Sequential(), r"Sequential: expected at least one layer"),
    ],
)
def test_bad_hyperparameters_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_unknown_activation_lists_known_names():
    with pytest.raises(ValueError, match=r"Activation: unknown activation 'foo'") as err:
        nn.activation("foo")
    for name in nn.ACTIVATIONS:
        assert repr(name) in str(err.value)


def test_sequential_rejects_non_layers():
    with pytest.raises(TypeError, match=r"Sequential.*int"):
        nn.Sequential(nn.Linear(2), 3)


# ----------------------------------------------------------------------------- user-defined layers


class Scale(nn.Module):
    """A user's layer: a learned per-feature scale."""

    def init_params(self, rng, input_shape, dtype):
        return {"scale": rng.uniform(0.5, 1.5, size=(input_shape[-1],)).astype(dtype)}, tuple(input_shape)

    def forward(self, be, params, x, *, key=None, train=False):
        return x * params["scale"]


class Residual(nn.Module):
    """A user's layer that nests another layer: ``x + inner(x)``."""

    def __init__(self, inner):
        self.inner = inner

    def init_params(self, rng, input_shape, dtype):
        p, shape = self.inner.init_params(rng, input_shape, dtype)
        if tuple(shape) != tuple(input_shape):
            raise ValueError(
                f"Residual: inner output shape {shape} differs from input shape {tuple(input_shape)}"
            )
        return {"inner": p}, shape

    def forward(self, be, params, x, *, key=None, train=False):
        return x + self.inner.forward(be, params["inner"], x, key=key, train=train)


class TorchScale(tnn.Module):
    def __init__(self, n):
        super().__init__()
        self.scale = tnn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.scale


class TorchResidual(tnn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


def _user_models():
    model = nn.Sequential(
        nn.Linear(6),
        Scale(),
        nn.gelu,
        Residual(nn.Sequential(nn.Linear(6), nn.tanh, nn.Linear(6))),
        nn.Sequential(nn.Linear(3), nn.Sequential(nn.relu, lambda x: 2.0 * x)),
        nn.Linear(2),
    )
    ref = tnn.Sequential(
        tnn.Linear(4, 6),
        TorchScale(6),
        tnn.GELU(),
        TorchResidual(tnn.Sequential(tnn.Linear(6, 6), tnn.Tanh(), tnn.Linear(6, 6))),
        tnn.Sequential(tnn.Linear(6, 3), tnn.ReLU()),  # (the x2 is applied below)
        tnn.Linear(3, 2),
    )
    return model, ref


def _ref_forward(ref, x):
    for i, m in enumerate(ref):
        x = m(x) * (2.0 if i == 4 else 1.0)
    return x


def test_user_layers_nest_and_match_torch_names(be):
    model, ref = _user_models()
    x = np.random.default_rng(0).standard_normal((3, 4))
    params = model.init(0, x)
    assert set(params) == {"0", "1", "3", "4", "5"}
    assert set(params["3"]) == {"inner"} and set(params["3"]["inner"]) == {"0", "2"}
    assert set(params["4"]) == {"0"}  # the nested Sequential keeps only its parameterised layer
    ref = load_torch(ref, params, "float64")  # names match torch's nested state_dict exactly
    out = model.apply(to_backend(be, params), be.asarray(x))
    assert_close(be.to_numpy(out), _ref_forward(ref, torch.as_tensor(x)).detach().numpy(), "float64")
    # gradients through the backend's autodiff vs torch autograd
    xb = be.asarray(x)
    _, g = be.jit(be.value_and_grad(lambda p: be.xp.sum(model.apply(p, xb) ** 2)))(to_backend(be, params))
    _ref_forward(ref, torch.as_tensor(x)).pow(2).sum().backward()
    g = flatten_dict(to_numpy(be, g))
    ref_g = {k: p.grad.numpy() for k, p in ref.named_parameters()}
    assert sorted(g) == sorted(ref_g)
    for k in g:
        assert_close(g[k], ref_g[k], "float64")


def test_user_layer_alone_and_shape_error(be):
    x = be.asarray(np.arange(6.0).reshape(2, 3))
    p = Scale().init(0, x)
    assert p["scale"].shape == (3,) and p["scale"].dtype == np.float64
    assert_close(
        be.to_numpy(Scale().apply(to_backend(be, p), x)), np.arange(6.0).reshape(2, 3) * p["scale"], "float64"
    )
    with pytest.raises(ValueError, match=r"Residual.*\(2, 4\).*\(2, 3\)"):
        Residual(nn.Linear(4)).init(0, (2, 3))
