"""LoRA adapters on a ported torch module's Linear submodules (issue 28, item 4): the adapted
model starts as the base module exactly, on torch (the module itself) and on JAX (the lowered
graph); its JVP along an adapter tangent is torch.func.jvp's and the finite difference's; only
the adapters train, on both backends, along the same trajectory; merge folds them back into the
original module; the user's module is never modified; bad arguments are named.
"""

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

RANK, ALPHA = 2, 8.0


class Net(tnn.Module):
    """Digits (N, 1, 8, 8) -> 10 logits: two blocks of Linear + LayerNorm, and a head."""

    def __init__(self):
        super().__init__()
        self.blocks = tnn.ModuleList(
            [tnn.Sequential(tnn.Linear(64, 24), tnn.LayerNorm(24)), tnn.Sequential(tnn.Linear(24, 24))]
        )
        self.head = tnn.Linear(24, 10)

    def forward(self, x):
        h = x.flatten(1)
        for block in self.blocks:
            h = torch.tanh(block(h))
        return self.head(h)


def _setup(dtype=torch.float32, targets="blocks.*"):
    torch.manual_seed(0)
    module = Net().to(dtype).eval()
    x = np.random.default_rng(0).normal(size=(6, 1, 8, 8)).astype(str(dtype).removeprefix("torch."))
    base = from_torch(module, torch.from_numpy(x))
    return module, base, dg.lora(base, rank=RANK, alpha=ALPHA, targets=targets), x


def _random_adapters(model, seed=1):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(scale=0.3, size=v.shape).astype(v.dtype) for k, v in model.init(0).items()}


def test_adapters_are_the_params_and_the_model_starts_as_the_base_exactly():
    module, base, model, x = _setup()
    before = copy.deepcopy(module.state_dict())
    assert model.lora.targets == ("blocks.0.0", "blocks.1.0")
    adapters = model.init(3, x)
    assert sorted(adapters) == sorted(model.trainable_names) == sorted(model.lora.names)
    assert adapters["blocks.0.0.lora_A"].shape == (RANK, 64)
    assert adapters["blocks.0.0.lora_B"].shape == (24, RANK)
    assert not adapters["blocks.1.0.lora_B"].any() and np.abs(adapters["blocks.1.0.lora_A"]).max() <= 24**-0.5
    # B = 0: the base module's output exactly, on torch (the module) and on JAX (the lowered graph)
    xt = torch.from_numpy(x)
    same = base.apply(base.params, xt).detach().numpy()
    np.testing.assert_array_equal(model.apply(adapters, xt).detach().numpy(), same)
    # (op by op: under jit the frozen weights are constants of the program, which XLA may lay out
    # and multiply in another order than arguments: the same numbers to rounding)
    xj = jnp.asarray(x)
    got = model.apply({k: jnp.asarray(v) for k, v in adapters.items()}, xj)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(base.apply(base.params, xj)))
    assert model.lowered_path == "export"
    jitted = jax.jit(model.apply)({k: jnp.asarray(v) for k, v in adapters.items()}, xj)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(got), rtol=1e-6, atol=1e-6)
    # the user's module is left as it was: no adapters, no hooks, the same weights
    assert not any(hasattr(m, "lora_A") or m._forward_hooks for m in module.modules())
    assert list(module.state_dict()) == list(before)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_jvp_along_an_adapter_tangent_is_torch_func_jvp_and_the_finite_difference():
    _, _, model, x = _setup(torch.float64, targets="*")
    adapters = _random_adapters(model)
    rng = np.random.default_rng(2)
    tangent = {k: rng.normal(size=v.shape) for k, v in adapters.items()}
    xt, xj = torch.from_numpy(x), jnp.asarray(x)
    # torch: forward mode through the adapted module itself (its hooks)
    want = torch.func.jvp(
        lambda p: model.apply(p, xt),
        ({k: torch.from_numpy(v) for k, v in adapters.items()},),
        ({k: torch.from_numpy(v) for k, v in tangent.items()},),
    )[1].numpy()
    # JAX: forward mode through the lowered graph
    got = jax.jvp(
        lambda p: model.apply(p, xj),
        ({k: jnp.asarray(v) for k, v in adapters.items()},),
        ({k: jnp.asarray(v) for k, v in tangent.items()},),
    )[1]
    eps = 1e-6
    up, down = (
        model.apply({k: torch.from_numpy(v + s * eps * tangent[k]) for k, v in adapters.items()}, xt).numpy()
        for s in (1, -1)
    )
    fd = (up - down) / (2 * eps)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(want, fd, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["backprop", "forward"])
def test_only_the_adapters_train_and_the_backends_follow_the_same_trajectory(digits, name):
    module, base, model, _ = _setup(targets="*")
    frozen = {k: v.copy() for k, v in model.params.items() if k not in model.trainable_names}
    estimator = dg.estimator(name) if name == "backprop" else dg.estimator("forward", num_tangents=4)
    # calibrate=False: a float64 reference run would need float64 base weights too
    report = dg.parity.compare_backends(
        model, "cross_entropy", dg.optim.adam(1e-2), estimator, digits,
        steps=8, batch_size=32, params=model.init(1), calibrate=False,
    )  # fmt: skip
    assert report.first_divergence is None, report.table(every=1)
    assert max(r["param_rel"] for r in report.records) < 1e-5
    result = dg.fit(
        model, model.init(1), digits, estimator=estimator, optimizer=dg.optim.adam(1e-2),
        backend="jax", steps=40, batch_size=64, callbacks=[],
    )  # fmt: skip
    losses = [r["loss"] for r in result.history]
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.1, (losses[:3], losses[-3:])
    assert sorted(result.params) == sorted(model.trainable_names)  # only the adapters
    for k, v in frozen.items():  # the base weights, bitwise
        np.testing.assert_array_equal(model.params[k], v, err_msg=k)
        np.testing.assert_array_equal(base.params[k], v, err_msg=k)
        np.testing.assert_array_equal(module.state_dict()[k].numpy(), v, err_msg=k)


def test_merge_folds_the_adapters_into_the_original_module(be):
    module, base, model, x = _setup(targets="*")
    adapters = dg.tree.tree_map(be.asarray, _random_adapters(model))
    xb = be.asarray(x)
    want = be.to_numpy(model.apply(adapters, xb))
    merged = model.merge(adapters)
    assert sorted(merged) == sorted(base.params)  # the base model's params, no adapters
    np.testing.assert_allclose(be.to_numpy(base.apply(merged, xb)), want, rtol=1e-5, atol=1e-5)
    target = copy.deepcopy(module)
    to_torch(merged, target)
    with torch.no_grad():
        np.testing.assert_allclose(target(torch.from_numpy(x)).numpy(), want, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(merged["head.weight"], base.params["head.weight"])


class TiedLM(tnn.Module):
    def __init__(self):
        super().__init__()
        self.emb = tnn.Embedding(11, 6)
        self.mid = tnn.Linear(6, 6)
        self.head = tnn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb.weight[x])))


def test_bad_arguments_are_named():
    module, base, model, x = _setup()
    with pytest.raises(ValueError, match="lora: rank must be a positive int, got 0"):
        dg.lora(base, rank=0)
    with pytest.raises(ValueError, match=r"targets pattern '\*.q_proj' matches no Linear layer of Net; "
                       r"its Linear layers are 'blocks.0.0', 'blocks.1.0', 'head'"):  # fmt: skip
        dg.lora(base, rank=2, targets=["head", "*.q_proj"])
    with pytest.raises(KeyError, match=r"keys \['nope'\]"):
        dg.lora(base, {"nope": np.zeros(3)}, rank=2)
    with pytest.raises(TypeError, match="adapted already"):
        dg.lora(model, rank=2)
    with pytest.raises(TypeError, match="has no LoRA adapters"):
        base.merge({})
    with pytest.raises(KeyError, match="adapters must be the model's params"):
        model.merge({"head.lora_A": np.zeros((2, 24))})
    torch.manual_seed(0)
    tied = from_torch(TiedLM(), torch.zeros(2, 3, dtype=torch.int64))
    lm = dg.lora(tied, rank=2, targets="*")
    assert lm.lora.targets == ("mid", "head")
    out = lm.apply(lm.init(0), torch.zeros(2, 3, dtype=torch.int64))  # trains, as any target
    assert out.shape == (2, 3, 11)
    with pytest.raises(ValueError, match="'head' is one tensor with"):
        lm.merge(lm.init(0))


def test_trained_base_weights_can_be_given():
    module, base, _, x = _setup()
    trained = {"head.weight": base.params["head.weight"] * 2}
    model = dg.lora(base, trained, rank=RANK, targets="head")
    xt = torch.from_numpy(x)
    base_out = base.apply({**base.params, **trained}, xt)
    np.testing.assert_array_equal(model.apply(model.init(0), xt).detach().numpy(), base_out.detach().numpy())
    assert base.params["head.weight"] is not model.params["head.weight"]
