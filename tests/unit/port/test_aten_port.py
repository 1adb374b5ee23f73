"""The torch.export lowering (core ATen rules onto duogard's backend contract), and ported
modules in training mode: JAX outputs and forward gradients against torch's own, batch norm's
running statistics returned as new buffers, dropout masks identical on both backends, one
error for every unsupported operator, tracing failures blamed on their real cause, and the
docs' operator table in sync with the rules."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import duogard as dg

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import torch.nn as tnn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from duogard.interop import UnsupportedTorchOpsError, from_torch  # noqa: E402

from aten_modules import Attn, Breadth, Funcs, LongAttn, ResNet18, Spatial  # noqa: E402
from helpers import ROOT  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

F32 = dict(rtol=1e-5, atol=2e-6)


def _np(t):
    return t.detach().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


# ----------------------------------------------------------------------------- modules


def _randomise_batchnorms(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, tnn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module


CASES = {
    "funcs": (Funcs, (3, 6)),
    "breadth": (Breadth, (3, 6)),
    "spatial": (Spatial, (2, 3, 4, 8)),
    "attention": (Attn, (2, 5, 8)),
    "long-attention": (LongAttn, (2, 600, 8)),  # be.attention: blocks of 512 keys
    "transformer": (lambda: tnn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), (2, 5, 8)),
    "resnet18": (lambda: _randomise_batchnorms(ResNet18()), (2, 3, 32, 32)),
}


# ----------------------------------------------------------------------------- outputs and jvps


@pytest.mark.parametrize("case", list(CASES))
def test_lowered_output_and_forward_gradient_match_torch(case):
    make, shape = CASES[case]
    torch.manual_seed(0)
    module = make().eval()
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    xt, xj = torch.from_numpy(x), jnp.asarray(x)
    model = from_torch(module, xt)
    with torch.no_grad():
        ref = _np(module(xt))

    rng = np.random.default_rng(2)
    primals = model.trainable()
    tangents = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in primals.items()}
    # one XLA compile for the whole jvp (op-by-op JAX compiles every primitive once)
    out, dout = jax.jit(lambda p, t: jax.jvp(lambda q: model.apply(q, xj), (p,), (t,)))(
        {k: jnp.asarray(v) for k, v in primals.items()}, {k: jnp.asarray(v) for k, v in tangents.items()}
    )
    assert model.lowered_path == "export" and model.lower(example_input=xj).path == "export"
    assert out.dtype == jnp.float32 and out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out), ref, **F32)

    # torch's fast attention kernel (eval mode) has no forward-mode rule: these modules have no
    # dropout or batch norm, so their training-mode forward is the same function
    # (and its fused CPU attention kernels neither: the math kernel has one)
    module.train(case in ("attention", "transformer"))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        tout, tdout = torch.func.jvp(
            lambda p: torch.func.functional_call(module, p, (xt,)),
            ({k: torch.from_numpy(v) for k, v in primals.items()},),
            ({k: torch.from_numpy(v) for k, v in tangents.items()},),
        )
    np.testing.assert_allclose(_np(tout), ref, **F32)
    scale = float(np.abs(_np(tdout)).max())
    assert scale > 0
    np.testing.assert_allclose(np.asarray(dout), _np(tdout), rtol=1e-5, atol=2e-6 * max(1.0, scale))


def test_long_attention_takes_the_blockwise_op_on_both_backends():
    """Over more than one block of keys the lowering calls be.attention (JAX: its custom_jvp;
    one block or fewer: the math form). On torch tensors the lowered graph's JVP needs no
    sdpa_kernel(MATH) either way: the blockwise op has its own forward-mode rule, and the math
    form's causal mask is made without a torch tensor (which torch.func.jvp would wrap)."""
    torch.manual_seed(0)
    module = LongAttn().eval()
    rng = np.random.default_rng(1)
    tbe = dg.backend("torch")
    for length, blockwise in ((512, False), (600, True)):
        x = rng.normal(size=(1, length, 8)).astype(np.float32)
        xt = torch.from_numpy(x)
        model = from_torch(module, xt)
        jaxpr = str(jax.make_jaxpr(model.apply)(model.params, jnp.asarray(x)))
        assert ("custom_jvp_call" in jaxpr) is blockwise, length

        graph = model.lower(example_input=xt)
        params = {k: torch.from_numpy(v) for k, v in model.params.items()}
        tangents = {k: torch.randn(v.shape) for k, v in params.items()}
        out, dout = torch.func.jvp(lambda p: graph.run(tbe, p, xt), (params,), (tangents,))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            want, dwant = torch.func.jvp(
                lambda p: torch.func.functional_call(module, p, (xt,)), (params,), (tangents,)
            )
        np.testing.assert_allclose(_np(out), _np(want), **F32)
        np.testing.assert_allclose(_np(dout), _np(dwant), rtol=1e-5, atol=1e-5)


def test_graphs_are_cached_per_shape_and_run_under_jit():
    torch.manual_seed(0)
    module = tnn.Sequential(tnn.Linear(6, 6), tnn.GELU(), tnn.LayerNorm(6))
    model = from_torch(module)
    for n in (3, 5):
        x = np.random.default_rng(n).normal(size=(n, 6)).astype(np.float32)
        got = jax.jit(model.apply)(model.params, jnp.asarray(x))
        with torch.no_grad():
            np.testing.assert_allclose(np.asarray(got), _np(module(torch.from_numpy(x))), **F32)
    assert sorted(k[1][0] for k in model._lowered) == [(3, 6), (5, 6)]
    # the lowered graph also runs on torch tensors, through the same backend contract
    graph = model.lower(example_input=torch.zeros(5, 6))
    x = torch.randn(5, 6)
    params = {k: torch.from_numpy(v) for k, v in model.params.items()}
    np.testing.assert_allclose(_np(graph.run(dg.backend("torch"), params, x)), _np(module(x)), **F32)


# ----------------------------------------------------------------------------- batch norm in training


class BatchNorms(tnn.Module):
    """BatchNorm2d with momentum=None (a cumulative average), BatchNorm1d on (N, C) and, without
    affine parameters, on (N, C, L)."""

    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv2d(2, 3, 3, padding=1)
        self.bn2d = tnn.BatchNorm2d(3, momentum=None)
        self.fc = tnn.Linear(48, 6)
        self.bn1d = tnn.BatchNorm1d(6, momentum=0.3)
        self.bn_seq = tnn.BatchNorm1d(2, affine=False)

    def forward(self, x):  # (N, 2, 4, 4)
        h = self.fc(torch.flatten(self.bn2d(self.conv(x)), 1))
        return self.bn_seq(self.bn1d(h).reshape(-1, 2, 3))


def test_batchnorm_training_returns_new_running_stats_and_mutates_nothing():
    torch.manual_seed(0)
    module = _randomise_batchnorms(BatchNorms(), seed=1)
    module.bn2d.num_batches_tracked.fill_(3)  # the cumulative factor is then 1 / 4
    shape = (5, 2, 4, 4)
    _randomise_batchnorms(module, seed=1)
    model = from_torch(module)
    assert model.has_state and model.has_train_mode
    state0 = model.initial_state()
    assert sorted(state0) == sorted(k for k in module.state_dict() if "running" in k or "num_batches" in k)
    before = {k: v.copy() for k, v in model.params.items()}
    xs = [np.random.default_rng(s).normal(size=shape).astype(np.float32) for s in (0, 1)]

    ref = copy.deepcopy(module).train()  # what torch does, in place, over two steps
    state_j, state_t = dict(state0), dict(state0)
    for x in xs:
        with torch.no_grad():
            ref_out = _np(ref(torch.from_numpy(x)))
        params_j = {**model.trainable(), **state_j}
        out_j = model.apply(params_j, jnp.asarray(x), train=True)
        np.testing.assert_allclose(np.asarray(out_j), ref_out, **F32)
        out_t = model.apply({**model.trainable(), **state_t}, torch.from_numpy(x), train=True)
        np.testing.assert_allclose(_np(out_t), ref_out, **F32)
        state_j = {k: np.asarray(v) for k, v in model.update_state(params_j, jnp.asarray(x)).items()}
        state_t = {
            k: _np(v).copy()
            for k, v in model.update_state({**model.trainable(), **state_t}, torch.from_numpy(x)).items()
        }
        for k, v in ref.state_dict().items():
            if k in state0:
                np.testing.assert_allclose(state_j[k], _np(v), rtol=1e-5, atol=1e-7, err_msg=f"jax {k}")
                np.testing.assert_allclose(state_t[k], _np(v), rtol=1e-5, atol=1e-7, err_msg=f"torch {k}")
    assert int(state_j["bn2d.num_batches_tracked"]) == 5 and int(state_j["bn1d.num_batches_tracked"]) == 2
    # nothing mutated: the model's params, the module's buffers
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v, err_msg=k)
    for k, v in module.state_dict().items():
        np.testing.assert_array_equal(_np(v), before[k], err_msg=k)
    # the reference discriminates: eval mode (running statistics) computes something else
    with torch.no_grad():
        assert not np.allclose(_np(module.eval()(torch.from_numpy(xs[1]))), ref_out, atol=1e-3)


# ----------------------------------------------------------------------------- dropout: same masks


class DropNorm(tnn.Module):
    def __init__(self):
        super().__init__()
        self.fc = tnn.Linear(6, 16)
        self.drop = tnn.Dropout(0.5)
        self.bn = tnn.BatchNorm1d(16)
        self.out = tnn.Linear(16, 3)

    def forward(self, x):
        h = self.bn(self.drop(self.fc(x)))  # batch statistics depend on the mask
        return self.out(F.dropout(torch.relu(h), 0.25, training=self.training))


def test_dropout_and_batchnorm_agree_on_torch_and_jax_given_the_key():
    torch.manual_seed(0)
    module = DropNorm()
    model = from_torch(module)
    assert model.has_train_mode and model.has_state
    x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
    tbe, jbe = dg.backend("torch"), dg.backend("jax")
    out_t = model.apply(model.params, torch.from_numpy(x), train=True, key=tbe.key(7))
    out_j = model.apply(model.params, jnp.asarray(x), train=True, key=jbe.key(7))
    np.testing.assert_allclose(np.asarray(out_j), _np(out_t), **F32)
    other = model.apply(model.params, jnp.asarray(x), train=True, key=jbe.key(8))
    assert not np.allclose(np.asarray(other), np.asarray(out_j))
    new_t = model.update_state(model.params, torch.from_numpy(x), key=tbe.key(7))
    new_j = model.update_state(model.params, jnp.asarray(x), key=jbe.key(7))
    assert sorted(new_t) == sorted(new_j) == sorted(model.initial_state())
    for k in new_t:
        np.testing.assert_allclose(np.asarray(new_j[k]), _np(new_t[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    assert not np.allclose(np.asarray(new_j["bn.running_mean"]), model.params["bn.running_mean"])


class AttentionDropout(tnn.Module):
    """Attention dropout on both of MultiheadAttention's paths (TransformerEncoderLayer's is
    need_weights=False): on the returned weights, and inside F.scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        self.mha = tnn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x)[0] + self.mha(x, x, x, need_weights=False)[0]


def test_attention_dropout_masks_agree_on_torch_and_jax():
    torch.manual_seed(0)
    module = AttentionDropout()
    model = from_torch(module)
    assert model.has_train_mode and not model.has_state
    assert from_torch(tnn.TransformerEncoderLayer(8, 2, 16, dropout=0.1)).has_train_mode
    assert not from_torch(tnn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)).has_train_mode
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
    out_t = model.apply(model.params, torch.from_numpy(x), train=True, key=dg.backend("torch").key(1))
    run = jax.jit(lambda p, k: model.apply(p, jnp.asarray(x), train=True, key=k))
    out_j = run(model.params, dg.backend("jax").key(1))
    np.testing.assert_allclose(np.asarray(out_j), _np(out_t), **F32)
    with torch.no_grad():
        assert not np.allclose(_np(module.eval()(torch.from_numpy(x))), np.asarray(out_j))
    # the module globals the attention path swaps for the call are restored
    assert F.dropout.__module__ == "torch.nn.functional"
    assert F.scaled_dot_product_attention.__module__ != __name__


def test_dropout_mask_is_the_portable_draw_on_every_path():
    from duogard_torch.port.lower import lower_module

    module = tnn.Sequential(tnn.Linear(16, 16), tnn.Dropout(0.5), tnn.Dropout(0.25))
    with torch.no_grad():
        module[0].weight.copy_(torch.eye(16))
        module[0].bias.zero_()
    model = from_torch(module)
    x = np.ones((8, 16), np.float32)  # the shape DropNorm draws: one generator compile
    jbe, tbe = dg.backend("jax"), dg.backend("torch")
    key = jbe.key(3)
    keep0 = np.asarray(jbe.bernoulli(jbe.fold_in(key, 0), 0.5, (8, 16)))
    keep1 = np.asarray(jbe.bernoulli(jbe.fold_in(key, 1), 0.75, (8, 16)))
    expected = np.where(keep0 & keep1, 1 / 0.5 / 0.75, 0.0)
    assert 0 < (expected == 0).mean() < 1
    export_out = model.apply(model.params, jnp.asarray(x), train=True, key=key)
    torch_out = model.apply(model.params, torch.from_numpy(x), train=True, key=tbe.key(3))
    fx_graph = lower_module(module, train=True)
    fx_out = fx_graph.run(jbe, {k: jnp.asarray(v) for k, v in model.params.items()}, jnp.asarray(x), key=key)
    for got in (export_out, torch_out, fx_out):
        np.testing.assert_allclose(_np(got), expected, rtol=1e-6)
    assert fx_graph.path == "fx" and model.lowered_path == "export"
    with pytest.raises(ValueError, match="key"):
        model.apply(model.params, jnp.asarray(x), train=True)


# ----------------------------------------------------------------------------- errors


class _Inner(tnn.Module):
    def forward(self, x):
        return torch.sort(x, dim=-1).values


class _Encoder(tnn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Inner()
        self.fc = tnn.Linear(4, 4)

    def forward(self, x):
        return self.inner(self.fc(x))


class Unlowerable(tnn.Module):
    def __init__(self):
        super().__init__()
        self.enc = _Encoder()

    def forward(self, x):
        return torch.special.erf(self.enc(x)) + torch.cumprod(x, dim=1)


def test_unsupported_operators_are_listed_in_one_error_with_module_paths():
    model = from_torch(Unlowerable(), torch.zeros(2, 4))
    with pytest.raises(UnsupportedTorchOpsError) as info:
        model.apply(model.params, jnp.ones((2, 4), jnp.float32))
    ops = {op.split(" ")[0]: path for _, op, path, _ in info.value.ops}
    assert ops == {
        "aten.sort.default": "'enc.inner' (_Inner)",
        "aten.erf.default": "'' (Unlowerable, the root)",
        "aten.cumprod.default": "'' (Unlowerable, the root)",
    }, info.value.ops
    text = str(info.value)
    assert "3 op(s)" in text and "from torch.special.erf" in text and "from torch.cumprod" in text


def clamp_probs(probs):
    """fwdgrad's helper: torch.finfo needs a concrete dtype."""
    eps = torch.finfo(probs.dtype).eps
    return probs.clamp(min=eps, max=1 - eps)


class FwdgradHead(tnn.Module):
    def __init__(self):
        super().__init__()
        self.lin = tnn.Linear(4, 3)

    def forward(self, x):
        return clamp_probs(torch.softmax(self.lin(x), dim=-1))


class DtypeInRoot(tnn.Module):
    def __init__(self):
        super().__init__()
        self.lin = tnn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        return h * h.dtype.is_floating_point


class DataDependent(tnn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_tracing_failures_report_their_real_cause():
    from duogard_torch.port.lower import lower_module

    # torch.export captures fwdgrad's clamp_probs (torch.finfo is a trace-time constant there)
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    model = from_torch(FwdgradHead(), torch.from_numpy(x))
    got = model.apply(model.params, jnp.asarray(x))
    assert model.lowered_path == "export"
    np.testing.assert_allclose(np.asarray(got), _np(model.module(torch.from_numpy(x))), **F32)
    # torch.fx cannot, and says why and where (not "control flow")
    with pytest.raises(NotImplementedError) as info:
        lower_module(FwdgradHead(), train=False)
    text = str(info.value)
    assert "finfo" in text and "in clamp_probs" in text and "torch.finfo(probs.dtype)" in text
    assert "control flow" not in text
    # an attribute read in the root forward is reported there, not in the module that made it
    with pytest.raises(UnsupportedTorchOpsError) as info:
        lower_module(DtypeInRoot(), train=False)
    (name, op, path, reason), *_ = info.value.ops
    assert op == "tensor attribute .dtype" and path.startswith("'' (DtypeInRoot")
    assert "'lin'" not in path and "lin" in reason
    # neither export nor fx: one error with both causes, pointing at the user's line
    model = from_torch(DataDependent(), torch.ones(2, 3))
    with pytest.raises(NotImplementedError) as info:
        model.apply(model.params, jnp.ones((2, 3), jnp.float32))
    text = str(info.value)
    assert "torch.export cannot capture DataDependent.forward" in text and "torch.fx" in text
    assert "control flow" in text and "if x.sum() > 0:" in text


def test_an_input_the_module_cannot_take_is_named_not_blamed_on_capture():
    model = from_torch(tnn.Sequential(tnn.Linear(4, 3), tnn.Tanh()))
    with pytest.raises(
        ValueError, match=r"fails on an input of shape \(2, 5\) and dtype float32.*mat1 and mat2"
    ):
        model.apply(model.params, jnp.ones((2, 5), jnp.float32))


def test_export_failure_falls_back_to_fx_and_says_so(monkeypatch):
    import duogard_torch.port.module as port_module
    from duogard_torch.port.export import ExportCaptureError

    def refuse(module, example, *, train):
        raise ExportCaptureError(type(module).__name__, RuntimeError("simulated export failure"))

    monkeypatch.setattr(port_module, "capture", refuse)
    torch.manual_seed(0)
    module = tnn.Sequential(tnn.Linear(3, 4), tnn.Tanh())
    model = from_torch(module)
    x = np.ones((2, 3), np.float32)
    got = model.apply(model.params, jnp.asarray(x))
    assert model.lowered_path == "fx" and "simulated export failure" in model.lowered_fallback_reason
    np.testing.assert_allclose(np.asarray(got), _np(module(torch.from_numpy(x))), **F32)


# ----------------------------------------------------------------------------- the docs table


def test_operator_table_in_the_docs_matches_the_rules():
    from duogard_torch.port.aten import op_name, rules, table_markdown

    path = ROOT / "docs" / "torch-ops.md"
    text = path.read_text(encoding="utf-8")
    assert text == table_markdown(), (
        "docs/torch-ops.md is stale: python -m duogard_torch.port.optable docs/torch-ops.md"
    )
    for op in rules():
        assert f"| `{op_name(op)}` |" in text
    for must in (
        "aten.convolution.default",
        "aten._native_batch_norm_legit_functional.default",
        "aten.native_dropout.default",
    ):
        assert must in text
