"""Tied weights in a ported module (an LM head sharing the embedding's weight): one trainable
parameter that every use in the lowered graph reads, on both lowerings and both backends, its
gradient the sum over its uses as torch's, and written back by to_torch to every name (the
module stays tied). Also: a submodule's own train/eval mode survives a ported call."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import duogard as dg

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import torch.nn as tnn  # noqa: E402

from duogard.interop import from_torch, to_torch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

VOCAB, DIM = 11, 6


class TinyLM(tnn.Module):
    """tanh(E[x] W + b) E^T: the head reads the embedding's weight (tied, as Hugging Face ties)."""

    def __init__(self, tied=True):
        super().__init__()
        self.emb = tnn.Embedding(VOCAB, DIM)
        self.mid = tnn.Linear(DIM, DIM)
        self.head = tnn.Linear(DIM, VOCAB, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x):
        # the embedding as an index (the fx fallback has no nn.Embedding; export sees the same)
        return self.head(torch.tanh(self.mid(self.emb.weight[x])))


def _by_hand(p, x):
    """The same function written out: the reference no tying mechanism can get wrong."""
    e = p["emb.weight"]
    return torch.tanh(e[x] @ p["mid.weight"].T + p["mid.bias"]) @ e.T


def _tokens():
    return np.random.default_rng(1).integers(0, VOCAB, size=(2, 5))


def _module(tied=True):
    torch.manual_seed(0)
    return TinyLM(tied)


def test_a_tied_tensor_is_one_parameter_under_its_first_name():
    module = _module()
    model = from_torch(module, torch.from_numpy(_tokens()))  # ran: no functional_call tie error
    assert model.tied == {"emb.weight": ("emb.weight", "head.weight")}
    assert "head.weight" not in model.params and set(model.trainable()) == {
        "emb.weight",
        "mid.weight",
        "mid.bias",
    }
    full = model.state_dict()
    assert set(full) == set(module.state_dict()) and full["head.weight"] is full["emb.weight"]
    with pytest.raises(KeyError, match=r"'head.weight' is tied to 'emb.weight'"):
        model.apply({**model.params, "head.weight": model.params["emb.weight"]}, jnp.asarray(_tokens()))
    assert from_torch(_module(tied=False)).tied == {}


@pytest.mark.parametrize("path", ["export", "fx"])
def test_perturbing_each_parameter_moves_the_output_as_torch_does(path):
    module = _module()
    x = _tokens()
    model = from_torch(module, torch.from_numpy(x) if path == "export" else None)
    jbe = dg.backend("jax")
    if path == "export":
        run = model.apply
    else:  # the fx graph, run as lowered_apply runs a graph: on every name (state_dict)
        graph = model.lower()
        assert graph.path == "fx"

        def run(p, xj):
            return graph.run(jbe, model.state_dict(p), xj)

    primals = model.trainable()
    rng = np.random.default_rng(2)
    tj = jax.jit(lambda p, t: jax.jvp(lambda q: run(q, jnp.asarray(x)), (p,), (t,))[1])
    pj = {k: jnp.asarray(v) for k, v in primals.items()}
    pt = {k: torch.from_numpy(v) for k, v in primals.items()}
    for name in primals:
        t = {
            k: np.zeros_like(v) if k != name else rng.normal(size=v.shape).astype(np.float32)
            for k, v in primals.items()
        }
        tt = {k: torch.from_numpy(v) for k, v in t.items()}
        ref = torch.func.jvp(lambda q: _by_hand(q, torch.from_numpy(x)), (pt,), (tt,))[1].numpy()
        assert np.abs(ref).max() > 0.1, name
        got = {
            "jax": np.asarray(tj(pj, {k: jnp.asarray(v) for k, v in t.items()})),
            "torch": torch.func.jvp(lambda q: model.apply(q, torch.from_numpy(x)), (pt,), (tt,))[1].numpy(),
            "module": torch.func.jvp(
                lambda q: torch.func.functional_call(module, q, (torch.from_numpy(x),)), (pt,), (tt,)
            )[1].numpy(),
        }
        for where, value in got.items():
            np.testing.assert_allclose(value, ref, rtol=1e-4, atol=1e-5, err_msg=f"{name} on {where}")


def test_the_tied_gradient_sums_both_uses_and_a_step_trains_it_on_both_backends():
    module = _module()
    x = _tokens()
    y = np.random.default_rng(3).integers(0, VOCAB, size=(2, 5))
    model = from_torch(module, torch.from_numpy(x))

    def loss_fn(p, b):
        return dg.losses.cross_entropy(model.apply(p, b[0]).reshape(-1, VOCAB), b[1].reshape(-1))

    # torch's own autograd on the module: the tied weight's .grad sums the embedding and the head
    loss = torch.nn.functional.cross_entropy(
        module(torch.from_numpy(x)).reshape(-1, VOCAB), torch.from_numpy(y).reshape(-1)
    )
    loss.backward()
    bp = dg.estimator("backprop")
    for be in (dg.backend("jax"), dg.backend("torch")):
        _, grads = bp(
            loss_fn, {k: be.asarray(v) for k, v in model.trainable().items()}, (be.asarray(x), be.asarray(y))
        )
        for name, p in module.named_parameters():
            np.testing.assert_allclose(
                be.to_numpy(grads[name]), p.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=f"{name} {be.name}"
            )

    est, jbe = dg.estimator("forward", num_tangents=2), dg.backend("jax")
    params = {k: jnp.asarray(v) for k, v in model.trainable().items()}
    _, g = est(loss_fn, params, (jnp.asarray(x), jnp.asarray(y)), jbe.key(0))
    stepped = {k: params[k] - 0.5 * g[k] for k in params}
    assert float(jnp.abs(stepped["emb.weight"] - params["emb.weight"]).max()) > 1e-4


def test_to_torch_writes_a_tied_tensor_to_every_name_and_keeps_it_tied():
    module = _module()
    model = from_torch(module)
    new = {k: v + 1.0 for k, v in model.params.items()}
    copied = copy.deepcopy(module)
    for target in (module, copied):  # a deep copy stays tied
        to_torch({k: jnp.asarray(v) for k, v in new.items()}, target)
        assert target.head.weight is target.emb.weight
        np.testing.assert_array_equal(target.head.weight.detach().numpy(), new["emb.weight"])
    # both names given: equal values load, different ones are refused
    to_torch(model.state_dict(new), module)
    with pytest.raises(ValueError, match="'emb.weight' and 'head.weight' are one tensor"):
        to_torch({**new, "head.weight": new["emb.weight"] + 1}, module)
    # a copy whose weights are not tied takes the value under every name from state_dict
    untied = _module(tied=False)
    with pytest.raises(KeyError, match="missing keys.*head.weight"):
        to_torch(new, untied)
    to_torch(model.state_dict(new), untied)
    assert untied.head.weight is not untied.emb.weight
    np.testing.assert_array_equal(untied.head.weight.detach().numpy(), new["emb.weight"])


def test_a_submodule_in_eval_mode_inside_a_training_root_stays_in_eval_mode():
    inner = tnn.Sequential(tnn.Linear(4, 4), tnn.Dropout(0.5)).eval()
    root = tnn.Sequential(inner)  # a wrapper: in training mode, as constructed
    x = torch.randn(3, 4)
    model = from_torch(root, x)
    model.apply(model.params, x)
    model.lower(example_input=jnp.asarray(x.numpy()))
    from_torch(root).lower()  # the fx lowering
    assert root.training and not inner.training and not inner[1].training
