"""Operators the model zoo needs (issue 28), each against eager torch's outputs and
torch.func.jvp's tangents in float32 and float64: scaled_dot_product_attention kept whole by
the capture (GPT-2's view of its output broke the decomposition), as_strided where its strides
address a view of the input's memory layout (ConvNeXt's adaptive pooling on channels-last),
and max_pool2d_with_indices with ceil_mode and its indices (SqueezeNet)."""

from __future__ import annotations

import numpy as np
import pytest

import duogard as dg

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import torch.nn as tnn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from duogard.interop import UnsupportedTorchOpsError, from_torch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

TOL = {"float32": dict(rtol=1e-5, atol=1e-6), "float64": dict(rtol=1e-10, atol=1e-12)}


def _np(t):
    return t.detach().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def check_against_torch(module, shape, dtype, *, seed=0):
    """The ported module's outputs (all of them) equal eager torch's, and the tangent of its first
    output along random tangents of the input and of every parameter equals torch.func.jvp's
    (torch's math attention kernel: its fused kernels have no forward-mode rule).

    Returns:
        The model.
    """
    torch.manual_seed(seed)
    module = module.to(getattr(torch, dtype)).eval()
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(dtype)
    model = from_torch(module, torch.from_numpy(x))
    with torch.no_grad():
        ref = _tuple(module(torch.from_numpy(x)))
    got = _tuple(model.apply(model.params, jnp.asarray(x)))
    assert model.lowered_path == "export", model.lowered_fallback_reason
    assert len(got) == len(ref)
    for r, g in zip(ref, got):
        assert g.shape == tuple(r.shape) and str(g.dtype) == str(r.dtype).removeprefix("torch."), (g, r)
        np.testing.assert_allclose(np.asarray(g), _np(r), **TOL[dtype])

    primals = model.trainable()
    tangents = {k: rng.normal(size=v.shape).astype(dtype) for k, v in primals.items()}
    tx = rng.normal(size=shape).astype(dtype)
    _, dout = jax.jvp(
        lambda p, xx: _tuple(model.apply(p, xx))[0],
        ({k: jnp.asarray(v) for k, v in primals.items()}, jnp.asarray(x)),
        ({k: jnp.asarray(v) for k, v in tangents.items()}, jnp.asarray(tx)),
    )
    with sdpa_kernel(SDPBackend.MATH):
        _, tdout = torch.func.jvp(
            lambda p, xx: _tuple(torch.func.functional_call(module, p, (xx,)))[0],
            ({k: torch.from_numpy(v) for k, v in primals.items()}, torch.from_numpy(x)),
            ({k: torch.from_numpy(v) for k, v in tangents.items()}, torch.from_numpy(tx)),
        )
    assert np.abs(_np(tdout)).max() > 0
    np.testing.assert_allclose(np.asarray(dout), _np(tdout), **TOL[dtype])
    return model


# ----------------------------------------------------------------------------- attention


class GPT2Attention(tnn.Module):
    """GPT-2's attention block as Hugging Face writes it (sdpa, then a view of the transposed
    output, then a Conv1D's ``x.view(-1, x.size(-1))``): the decomposition failed on that view.
    """

    def __init__(self, dim=8, heads=2, **kw):
        super().__init__()
        self.heads, self.kw = heads, kw
        self.qkv = tnn.Linear(dim, 3 * dim)
        self.proj = tnn.Parameter(torch.randn(dim, dim) / dim**0.5)

    def forward(self, x):  # (N, L, dim)
        n, length, dim = x.shape
        q, k, v = (
            t.view(n, length, -1, dim // self.heads).transpose(1, 2) for t in self.qkv(x).split(dim, dim=-1)
        )
        kw = dict(self.kw)
        if kw.pop("gqa", False):  # two query heads share one key/value head
            k, v, kw["enable_gqa"] = k[:, :1], v[:, :1], True
        if kw.get("attn_mask") == "bool":  # the last query sees no key: a fully masked row
            mask = torch.ones(length, length, dtype=torch.bool).tril()
            kw["attn_mask"] = mask & (torch.arange(length) < length - 1)[:, None]
        elif kw.get("attn_mask") == "float":
            kw["attn_mask"] = torch.linspace(-1.0, 1.0, length * length, dtype=x.dtype).view(length, length)
        a = F.scaled_dot_product_attention(q, k, v, **kw)
        a = a.transpose(1, 2).reshape(n, length, -1).contiguous()
        return torch.addmm(torch.zeros(dim, dtype=x.dtype), a.view(-1, a.size(-1)), self.proj).view(
            n, length, dim
        )


ATTENTION = {
    "plain": {},
    "causal": {"is_causal": True},
    "bool_mask": {"attn_mask": "bool"},
    "float_mask": {"attn_mask": "float", "scale": 0.7},
    "gqa": {"gqa": True, "is_causal": True},
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", list(ATTENTION))
def test_attention_is_kept_whole_and_lowered_to_the_math_form(case, dtype):
    model = check_against_torch(GPT2Attention(**ATTENTION[case]), (2, 5, 8), dtype)
    graph = model.lower(example_input=jnp.zeros((2, 5, 8), dtype=dtype))
    assert [s.op for s in graph.steps].count(torch.ops.aten.scaled_dot_product_attention.default) == 1


def test_attention_dropout_is_the_same_portable_draw_on_both_backends():
    torch.manual_seed(0)
    module = GPT2Attention(dropout_p=0.4, is_causal=True)
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
    model = from_torch(module, torch.from_numpy(x))
    jbe, tbe = dg.backend("jax"), dg.backend("torch")
    got = model.apply(model.params, jnp.asarray(x), train=True, key=jbe.key(3))
    ref = model.apply(model.params, torch.from_numpy(x), train=True, key=tbe.key(3))
    np.testing.assert_allclose(np.asarray(got), _np(ref), rtol=1e-5, atol=1e-6)
    assert model.lowered_path == "export", model.lowered_fallback_reason
    other = model.apply(model.params, jnp.asarray(x), train=True, key=jbe.key(4))
    assert np.abs(np.asarray(other) - np.asarray(got)).max() > 1e-3  # the masks are drawn


# ----------------------------------------------------------------------------- as_strided


class ChannelsLastPool(tnn.Module):
    """ConvNeXt's head: adaptive average pooling of a channels-last activation (its
    decomposition leaves ``as_strided(mean, size, channels-last strides)``)."""

    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv2d(3, 4, 3)

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.conv(x).to(memory_format=torch.channels_last), 1)


class Strided(tnn.Module):
    """as_strided views of a channels-last and of a contiguous input: the layout itself, a
    transpose, a window at an offset, overlapping windows."""

    def forward(self, x):  # (2, 3, 4, 5)
        cl = (x * 2).to(memory_format=torch.channels_last)
        same = cl.as_strided(cl.shape, cl.stride())
        flat = x.reshape(8, 15)
        transposed = flat.as_strided((15, 8), (1, 15))
        offset = flat.as_strided((3, 4), (15, 1), 17)
        windows = flat.as_strided((7, 2, 15), (15, 15, 1))  # rows i and i + 1: overlapping
        return same.sum() + transposed.sum(0)[:3].sum() + offset.mean() + (windows * windows).sum(), windows


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("module", [ChannelsLastPool, Strided])
def test_as_strided_views_of_the_inputs_memory_layout(module, dtype):
    model = check_against_torch(module(), (2, 3, 4, 5) if module is Strided else (2, 3, 7, 6), dtype)
    ops = [
        s.op
        for s in model.lower(
            example_input=jnp.zeros((2, 3, 4, 5) if module is Strided else (2, 3, 7, 6), dtype=dtype)
        ).steps
    ]
    assert torch.ops.aten.as_strided.default in ops


def test_as_strided_of_a_layout_it_cannot_see_through_is_refused_by_name():
    class Gappy(tnn.Module):
        def forward(self, x):
            y = x[:, ::2]  # every other column: not a dense layout
            return y.as_strided((2, 2), (1, 2))

    with pytest.raises(UnsupportedTorchOpsError, match=r"as_strided.*not a dense layout"):
        from_torch(Gappy(), torch.zeros(4, 6), lower=True)


# ----------------------------------------------------------------------------- max pooling


class Pool(tnn.Module):
    def __init__(self, padding=0, ceil_mode=True, stride=2):
        super().__init__()
        self.pool = tnn.MaxPool2d(3, stride, padding=padding, ceil_mode=ceil_mode, return_indices=True)

    def forward(self, x):
        values, indices = self.pool(x)
        return values * 2, indices


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "kw,shape",
    [
        ({}, (2, 3, 10, 9)),  # SqueezeNet's MaxPool2d(3, 2, ceil_mode=True): partial last windows
        ({"padding": 1}, (2, 3, 11, 8)),
        ({"ceil_mode": False, "stride": 1}, (3, 7, 6)),  # unbatched, the indices alone
    ],
)
def test_max_pool_with_ceil_mode_and_its_indices(kw, shape, dtype):
    check_against_torch(Pool(**kw), shape, dtype)


def test_max_pool_indices_are_int64_as_torch_gives_them():
    model = from_torch(Pool(), torch.zeros(1, 1, 5, 5))
    x = np.arange(25, dtype=np.float32).reshape(1, 1, 5, 5)[..., ::-1].copy()
    _, idx = model.apply(model.params, jnp.asarray(x))
    _, ref = Pool()(torch.from_numpy(x))
    assert model.lowered_path == "export" and str(idx.dtype) == "int64"
    np.testing.assert_array_equal(np.asarray(idx), ref.numpy())


# ----------------------------------------------------------------------------- training-mode draws


class StochasticDepth(tnn.Module):
    """torchvision.ops.StochasticDepth's row mode, as it writes it (``bernoulli_`` in place)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype)
        noise = noise.bernoulli_(1 - self.p)
        return x * noise.div_(1 - self.p)


class Draws(tnn.Module):
    """In-place dropout (MobileNetV3, EfficientNet), stochastic depth, a functional bernoulli."""

    def __init__(self):
        super().__init__()
        self.lin = tnn.Linear(6, 6)
        self.drop = tnn.Dropout(0.3, inplace=True)
        self.depth = StochasticDepth(0.5)
        self.out = tnn.Linear(6, 6)

    def forward(self, x):
        h = self.depth(self.drop(torch.tanh(self.lin(x))))
        return self.out(h) * torch.bernoulli(torch.zeros_like(x), 0.5)


def test_in_place_dropout_and_stochastic_depth_draw_the_same_masks_on_both_backends():
    torch.manual_seed(0)
    module = Draws()
    x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
    model = from_torch(module, torch.from_numpy(x))
    assert model.has_train_mode
    jbe, tbe = dg.backend("jax"), dg.backend("torch")
    primals = model.trainable()
    tangents = {
        k: np.random.default_rng(1).normal(size=v.shape).astype(np.float32) for k, v in primals.items()
    }
    outs = []
    for seed in (0, 1):
        got, dgot = jax.jvp(
            lambda p: model.apply(p, jnp.asarray(x), train=True, key=jbe.key(seed)),
            ({k: jnp.asarray(v) for k, v in primals.items()},),
            ({k: jnp.asarray(v) for k, v in tangents.items()},),
        )
        assert model.lowered_path == "export", model.lowered_fallback_reason
        ref, dref = torch.func.jvp(
            lambda p: model.apply(p, torch.from_numpy(x), train=True, key=tbe.key(seed)),
            ({k: torch.from_numpy(v) for k, v in primals.items()},),
            ({k: torch.from_numpy(v) for k, v in tangents.items()},),
        )
        np.testing.assert_allclose(np.asarray(got), _np(ref), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(dgot), _np(dref), rtol=1e-5, atol=1e-6)
        outs.append(np.asarray(got))
    assert np.abs(outs[0] - outs[1]).max() > 1e-3  # the masks are drawn from the key
    # in eval mode nothing is drawn but the functional bernoulli, which needs a key
    with pytest.raises(ValueError, match="bernoulli draw .* needs an explicit random key"):
        model.apply(model.params, jnp.asarray(x))


# ----------------------------------------------------------------------------- average pooling


class AvgPool(tnn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.pool = tnn.AvgPool2d(**kw)

    def forward(self, x):
        return self.pool(x) * 2


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "kw,shape",
    [
        (dict(kernel_size=3, stride=2, ceil_mode=True), (2, 3, 10, 9)),  # partial last windows
        (dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), (2, 2, 8, 11)),
        (dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False), (1, 2, 8, 7)),
        (dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1), divisor_override=5), (2, 7, 6)),
    ],
)
def test_avg_pool_with_ceil_mode_and_a_divisor_override(kw, shape, dtype):
    check_against_torch(AvgPool(**kw), shape, dtype)


# ----------------------------------------------------------------------------- index_put


class IndexPut(tnn.Module):
    """Writes into a buffer at constant integer indices (set and accumulate, a repeated index,
    negative ones, two index tensors), and through a boolean mask."""

    def __init__(self):
        super().__init__()
        self.lin = tnn.Linear(4, 4)

    def forward(self, x):
        h = torch.tanh(self.lin(x))  # (6, 4)
        out = torch.zeros(5, 4, dtype=h.dtype)
        out[torch.tensor([0, -1, 2])] = h[:3]
        acc = torch.ones(5, 4, dtype=h.dtype).index_put((torch.tensor([1, 3, 1]),), h[3:], accumulate=True)
        grid = torch.zeros(3, 4, dtype=h.dtype)
        grid[torch.tensor([0, 2]), torch.tensor([[1], [3]])] = h[0, 0] * h[1, 1]
        masked = h.clone()
        masked[h > 0.2] = 0.5
        return out + acc, grid, masked


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_index_put_sets_and_accumulates_as_torch(dtype):
    model = check_against_torch(IndexPut(), (6, 4), dtype)
    # the torch backend runs the same lowering
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(6, 4)).astype(dtype))
    module = IndexPut().to(getattr(torch, dtype))
    module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in model.params.items()})
    got = model.apply({k: torch.from_numpy(np.asarray(v)) for k, v in model.params.items()}, x)
    with torch.no_grad():
        for g, r in zip(got, module(x)):
            np.testing.assert_allclose(_np(g), _np(r), **TOL[dtype])


def test_index_put_with_a_mask_and_many_values_is_refused_by_name():
    class MaskedRows(tnn.Module):
        def forward(self, x):
            y = x.clone()
            y[x[:, 0] > 0] = x[:2] * 0  # as many rows as the mask has: data-dependent
            return y

    with pytest.raises(UnsupportedTorchOpsError, match="index_put.*boolean mask"):
        from_torch(MaskedRows(), torch.ones(2, 3), lower=True)


# ----------------------------------------------------------------------------- tensor probabilities


class TensorDraws(tnn.Module):
    """Bernoulli draws with one probability per entry: functional (captured as rand < p) and in
    place (``bernoulli_(p)``), as gating and sparsifying layers write them."""

    def __init__(self):
        super().__init__()
        self.lin = tnn.Linear(6, 6)

    def forward(self, x):
        h = self.lin(x) * 4  # probabilities spread over (0, 1)
        p = torch.sigmoid(h).detach()
        gate = torch.bernoulli(p)
        noise = torch.empty_like(h).bernoulli_(p)
        return h * gate, gate, noise, torch.rand(x.shape[0], 2)


def test_bernoulli_with_tensor_probabilities_draws_the_same_masks_on_both_backends():
    torch.manual_seed(0)
    module = TensorDraws()
    x = np.random.default_rng(0).normal(size=(512, 6)).astype(np.float32)
    model = from_torch(module, torch.from_numpy(x))
    jbe, tbe = dg.backend("jax"), dg.backend("torch")
    got = [np.asarray(a) for a in model.apply(model.params, jnp.asarray(x), train=True, key=jbe.key(3))]
    assert model.lowered_path == "export", model.lowered_fallback_reason
    ref = [_np(a) for a in model.apply(model.params, torch.from_numpy(x), train=True, key=tbe.key(3))]
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    gate, noise, uniform = got[1], got[2], got[3]
    assert 0 <= uniform.min() and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 0.05
    assert set(np.unique(gate)) <= {0.0, 1.0} and set(np.unique(noise)) <= {0.0, 1.0}
    assert (gate != noise).mean() > 0.2  # two draws, two keys
    # each entry is 1 with its own probability: the mean over entries matches the mean of p
    with torch.no_grad():
        p = torch.sigmoid(module.lin(torch.from_numpy(x)) * 4).numpy()
    for draw in (gate, noise):
        assert abs(draw.mean() - p.mean()) < 0.03, (draw.mean(), p.mean())
        assert (p > 0.9).sum() > 50 and (p < 0.1).sum() > 50
        assert draw[p > 0.9].mean() > 0.85 and draw[p < 0.1].mean() < 0.15
    other = np.asarray(model.apply(model.params, jnp.asarray(x), train=True, key=jbe.key(4))[1])
    assert (other != gate).any()  # the masks come from the key
    with pytest.raises(ValueError, match="(rand|bernoulli) draw .* needs an explicit random key"):
        model.apply(model.params, jnp.asarray(x))
