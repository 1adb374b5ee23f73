"""LoRA adapters on a Sequential's Linear layers (issue 28, item 4), on both backends: the adapted
model starts as the base model exactly (B = 0), its params are only the adapters, training
changes nothing else, its forward rule and the frameworks' jvp give the finite-difference
directional derivative along an adapter tangent, every weight-space estimator lowers the loss,
the two backends follow the same trajectory, and bad arguments are named in the errors.
"""

from __future__ import annotations

import numpy as np
import pytest

import duogard as dg
from duogard import losses, nn, optim
from duogard.grad._rules import plan
from duogard.tree import flatten_dict, tree_map

from helpers import AVAILABLE, to_backend, to_numpy

RANK, ALPHA = 3, 6.0


def _base(nested=True):
    inner = [nn.Sequential(nn.Linear(16), nn.tanh)] if nested else [nn.Linear(16), nn.tanh]
    return nn.Sequential(nn.Flatten(), nn.Linear(24), nn.relu, *inner, nn.Linear(10))


def _setup(dtype="float32", targets="*", nested=True):
    x = np.random.default_rng(0).normal(size=(6, 1, 8, 8)).astype(dtype)
    base = _base(nested)
    weights = base.init(0, x)
    model = dg.lora(base, weights, rank=RANK, alpha=ALPHA, targets=targets)
    return base, weights, model, x


def _random_adapters(model, x, seed=1):
    """Adapters with B != 0 too (init makes B zeros), so both factors move the output."""
    rng = np.random.default_rng(seed)
    return tree_map(lambda a: rng.normal(scale=0.3, size=a.shape).astype(a.dtype), model.init(0, x))


def test_params_are_only_the_adapters_and_b_zero_gives_the_base_output_exactly(be):
    base, weights, model, x = _setup()
    assert model.lora.targets == ("1", "3.0", "4")
    adapters = model.init(7, x)
    flat = flatten_dict(adapters)
    assert sorted(flat) == sorted(f"{t}.lora_{p}" for t in model.lora.targets for p in "AB")
    assert flat["1.lora_A"].shape == (RANK, 64) and flat["1.lora_B"].shape == (24, RANK)
    assert flat["3.0.lora_A"].shape == (RANK, 24) and flat["4.lora_B"].shape == (10, RANK)
    for t in model.lora.targets:  # A as torch.nn.Linear's weight, B zeros
        a, n_in = flat[f"{t}.lora_A"], flat[f"{t}.lora_A"].shape[1]
        assert 0 < np.abs(a).max() <= 1 / np.sqrt(n_in) and not flat[f"{t}.lora_B"].any()
    xb = be.asarray(x)
    want = be.to_numpy(base.apply(to_backend(be, weights), xb))
    got = be.to_numpy(model.apply(to_backend(be, adapters), xb))
    np.testing.assert_array_equal(got, want)  # bitwise: W x + b + s (x Aᵀ) 0ᵀ
    # a seed of its own: the adapters are drawn from init's seed, not the base's
    assert not np.array_equal(flatten_dict(model.init(8, x))["1.lora_A"], flat["1.lora_A"])


def test_output_is_the_base_plus_the_low_rank_update_and_merge_folds_it(be):
    base, weights, model, x = _setup("float64")
    adapters = _random_adapters(model, x)
    xb = be.asarray(x)
    got = be.to_numpy(model.apply(to_backend(be, adapters), xb))
    # by hand: each targeted layer is x Wᵀ + b + (alpha / rank) x Aᵀ Bᵀ
    h = x.reshape(len(x), -1)
    for path, act in (("1", lambda z: np.maximum(z, 0)), ("3.0", np.tanh), ("4", lambda z: z)):
        w, a = flatten_dict(weights), flatten_dict(adapters)
        z = h @ w[f"{path}.weight"].T + w[f"{path}.bias"]
        h = act(z + (ALPHA / RANK) * (h @ a[f"{path}.lora_A"].T) @ a[f"{path}.lora_B"].T)
    np.testing.assert_allclose(got, h, rtol=1e-12, atol=1e-12)
    merged = model.merge(adapters)
    np.testing.assert_allclose(be.to_numpy(base.apply(to_backend(be, merged), xb)), h, rtol=1e-11, atol=1e-12)
    # merge made new arrays: the frozen base weights are untouched
    for k, v in flatten_dict(model.base_params).items():
        np.testing.assert_array_equal(v, flatten_dict(weights)[k])


@pytest.mark.parametrize("tangents", ["dense", "rank1"])
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_jvp_along_an_adapter_tangent_rules_framework_and_finite_differences(be, tangents, nested):
    _, _, model, x = _setup("float64", targets="*" if nested else "[14]", nested=nested)
    y = np.arange(len(x)) % 10
    obj = dg.supervised(model, losses.cross_entropy)
    adapters = to_backend(be, _random_adapters(model, x))
    batch = (be.asarray(x), be.asarray(y))
    # the hand-written rules cover LoRALinear and Frozen layers (a nested Sequential: the framework's)
    assert (plan(obj, batch) is None) == nested
    options = {"num_tangents": 2, "tangents": tangents}
    framework = dg.estimator("forward", jvp="framework", **options)
    vtree = framework.tangent_tree(adapters, be.key(3))
    _, d_framework = framework._directional(obj, adapters, batch, vtree)
    rules = dg.estimator("forward", jvp="rules", **options)
    d_rules = d_framework if nested else rules._directional(obj, adapters, batch, vtree)[1]
    dense = tree_map(lambda t: to_numpy(be, t.dense(be.xp) if hasattr(t, "dense") else t), vtree)
    p0, eps = to_numpy(be, adapters), 1e-6
    for k in range(2):  # central differences in float64, on the backend's own forward
        shifted = [tree_map(lambda p, t, s=s: p + s * eps * t[k], p0, dense) for s in (1, -1)]
        up, down = (float(obj(to_backend(be, p), batch)) for p in shifted)
        fd = (up - down) / (2 * eps)
        np.testing.assert_allclose(float(d_rules[k]), fd, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(float(d_framework[k]), fd, rtol=1e-6, atol=1e-9)
    assert np.abs(to_numpy(be, d_rules)).min() > 1e-4  # B != 0: the tangent moves the loss


ESTIMATORS = {
    "backprop": lambda: dg.estimator("backprop"),
    "forward": lambda: dg.estimator("forward", num_tangents=4),
    "forward-rank1": lambda: dg.estimator("forward", tangents="rank1"),
    "forward-lean": lambda: dg.estimator("forward", num_tangents=2, lean=True),
    "spsa": lambda: dg.estimator("spsa", num_queries=4),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_fit_trains_only_the_adapters_and_lowers_the_loss(be, digits, name):
    base = nn.Sequential(nn.Flatten(), nn.Linear(32), nn.relu, nn.Linear(10))
    weights = base.init(0, digits.example_input)
    before = tree_map(np.copy, weights)
    model = dg.lora(base, weights, rank=4, alpha=16)
    adapters = model.init(1, digits.example_input)
    # the lean step is SGD's own; B starts at zero, so Adam's normalised steps get going sooner
    optimizer = optim.sgd(0.05) if name == "forward-lean" else optim.adam(1e-2)
    result = dg.fit(
        model, adapters, digits, estimator=ESTIMATORS[name](), optimizer=optimizer,
        backend=be.name, steps=60, batch_size=64, callbacks=[],
    )  # fmt: skip
    losses_ = [r["loss"] for r in result.history]
    assert np.mean(losses_[-10:]) < np.mean(losses_[:10]) - 0.04, (losses_[:3], losses_[-3:])
    trained = to_numpy(be, result.params)
    assert sorted(flatten_dict(trained)) == sorted(flatten_dict(adapters))  # only the adapters
    assert all(np.abs(v).max() > 0 for k, v in flatten_dict(trained).items() if k.endswith("lora_B"))
    for k, v in flatten_dict(before).items():  # the base weights, bitwise: theirs and the model's
        np.testing.assert_array_equal(flatten_dict(weights)[k], v)
        np.testing.assert_array_equal(flatten_dict(model.base_params)[k], v)


@pytest.mark.integration
@pytest.mark.skipif(len(AVAILABLE) < 2, reason="needs both jax and torch installed")
@pytest.mark.parametrize("name", ["backprop", "forward"])
def test_the_two_backends_follow_the_same_trajectory(digits, name):
    base = nn.Sequential(nn.Flatten(), nn.Linear(32), nn.relu, nn.Linear(10))
    model = dg.lora(base, base.init(0, digits.example_input), rank=4, alpha=16)
    report = dg.parity.compare_backends(
        model, "cross_entropy", optim.adam(1e-2), ESTIMATORS[name](), digits, steps=10, batch_size=32
    )
    assert report.first_divergence is None, report.table(every=1)
    assert report.records[-1]["loss_a"] < report.records[0]["loss_a"]
    assert max(r["param_rel"] for r in report.records) < 1e-5
    assert max(abs(r["loss_a"] - r["loss_b"]) for r in report.records) < 1e-5


def test_bad_arguments_are_named():
    base, weights, _, x = _setup()
    for rank in (0, -2, 1.5, True, "4"):
        with pytest.raises(ValueError, match="lora: rank must be a positive int"):
            dg.lora(base, weights, rank=rank)
    for alpha in (0, -1.0, float("nan"), float("inf"), "8"):
        with pytest.raises(ValueError, match="lora: alpha must be"):
            dg.lora(base, weights, rank=2, alpha=alpha)
    with pytest.raises(
        ValueError, match=r"targets pattern '\*.q_proj' matches no Linear layer.*'1', '3.0', '4'"
    ):
        dg.lora(base, weights, rank=2, targets="1|*.q_proj")
    with pytest.raises(ValueError, match="targets must name at least one pattern"):
        dg.lora(base, weights, rank=2, targets="1|")
    with pytest.raises(TypeError, match="lora: targets must be an fnmatch pattern"):
        dg.lora(base, weights, rank=2, targets=3)
    with pytest.raises(ValueError, match="lora: params .* are needed"):
        dg.lora(base, rank=2)
    with pytest.raises(ValueError, match="frozen params of layer '1'"):  # weights of another input size
        dg.lora(base, base.init(0, np.zeros((2, 32), "float32")), rank=2).init(0, x)
    with pytest.raises(TypeError, match="lora: model must be a duogard.nn.Sequential"):
        dg.lora(nn.Linear(3), {"weight": np.zeros((3, 2))}, rank=2)
    with pytest.raises(TypeError, match="adapted already"):
        dg.lora(dg.lora(base, weights, rank=2), weights, rank=2)
    with pytest.raises(ValueError, match="has no Linear layer"):
        dg.lora(nn.Sequential(nn.Conv2d(2, 3)), nn.Sequential(nn.Conv2d(2, 3)).init(0, x), rank=2)


def test_only_the_targets_are_adapted_the_rest_frozen(be):
    base, weights, model, x = _setup(targets=["3.*", "4"])
    assert model.lora.targets == ("3.0", "4")
    assert isinstance(model.layers[1], nn.Frozen) and isinstance(model.layers[4], nn.LoRALinear)
    assert sorted(flatten_dict(model.init(0, x))) == ["3.0.lora_A", "3.0.lora_B", "4.lora_A", "4.lora_B"]


def test_activity_perturbation_names_the_layer_it_cannot_perturb(be):
    _, _, model, x = _setup()
    obj = dg.supervised(model, losses.cross_entropy)
    batch = (be.asarray(x), be.asarray(np.arange(len(x)) % 10))
    with pytest.raises(TypeError, match=r"layer 1 \(LoRALinear\) has parameters but is neither Linear"):
        dg.estimator("forward-activity")(obj, to_backend(be, model.init(0, x)), batch, be.key(0))
