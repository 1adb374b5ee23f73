"""LoRA on a Hugging Face GPT-2 (issue 28, item 4), in a tiny config built from its config (random
weights, no download, its LM head untied): adapters on every Linear layer, the attention and MLP
projections (Hugging Face ``Conv1D``, whose weight is (in, out)) and the head. It starts as the
base model exactly on both backends, its JVP along an
adapter tangent is torch.func.jvp's, forward gradients and backprop lower the loss on both
backends along the same trajectory with every base weight unchanged, and merge folds the
trained adapters back into the module.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import duogard as dg

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
tr = pytest.importorskip("transformers", reason="the GPT-2 LoRA test needs transformers")
import jax.numpy as jnp  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

VOCAB, STEPS = 50, 12


class NextToken(torch.nn.Module):
    """GPT-2's logits at the last position: the next token after a window."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(input_ids=x, use_cache=False).logits[:, -1]


@pytest.fixture(scope="module")
def setup():
    tr.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = tr.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, tie_word_embeddings=False
    )
    module = NextToken(tr.GPT2LMHeadModel(config)).eval()
    rng = np.random.default_rng(0)
    x = rng.integers(0, VOCAB, size=(320, 6))
    y = x[:, 0] % 5  # the first token decides, among 5 of the 50
    data = dg.data.Dataset("next-token", x[:256], y[:256], x[256:], y[256:], num_classes=VOCAB)
    base = dg.from_torch(module, torch.from_numpy(x[:2]))
    model = dg.lora(base, rank=4, alpha=16, targets="*")
    return module, base, model, data


def test_gpt2_lora_starts_as_the_base_and_its_jvp_is_torchs(setup):
    module, base, model, data = setup
    targets = model.lora.targets
    assert len(targets) == 9 and targets[0] == "m.transformer.h.0.attn.c_attn" and targets[-1] == "m.lm_head"
    adapters = model.init(0, data.example_input)
    assert adapters["m.transformer.h.0.attn.c_attn.lora_A"].shape == (4, 32)
    assert adapters["m.transformer.h.0.attn.c_attn.lora_B"].shape == (96, 4)
    x = data.x_test[:4]
    xt, xj = torch.from_numpy(x), jnp.asarray(x)
    with torch.no_grad():
        want = module(xt).numpy()
    same = base.apply(base.params, xt).detach().numpy()
    np.testing.assert_array_equal(model.apply(adapters, xt).detach().numpy(), same)
    np.testing.assert_allclose(model.apply(adapters, xt).detach().numpy(), want, rtol=1e-6, atol=1e-6)
    got = model.apply({k: jnp.asarray(v) for k, v in adapters.items()}, xj)  # op by op (see the unit test)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(base.apply(base.params, xj)))
    assert model.lowered_path == "export", model.lowered_fallback_reason

    rng = np.random.default_rng(1)
    primal = {k: rng.normal(scale=0.1, size=v.shape).astype(np.float32) for k, v in adapters.items()}
    tangent = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in adapters.items()}
    with sdpa_kernel(SDPBackend.MATH):  # torch's fused attention has no forward-mode rule
        want = torch.func.jvp(
            lambda p: model.apply(p, xt),
            ({k: torch.from_numpy(v) for k, v in primal.items()},),
            ({k: torch.from_numpy(v) for k, v in tangent.items()},),
        )[1].numpy()
    got = jax.jit(lambda p, t: jax.jvp(lambda q: model.apply(q, xj), (p,), (t,))[1])(
        {k: jnp.asarray(v) for k, v in primal.items()}, {k: jnp.asarray(v) for k, v in tangent.items()}
    )
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("name", ["forward", "backprop"])
def test_gpt2_lora_trains_on_both_backends_along_one_trajectory(setup, name):
    module, base, model, data = setup
    frozen = {k: v.copy() for k, v in model.params.items() if k not in model.trainable_names}
    forward = name == "forward"
    estimator = dg.estimator("forward", num_tangents=4) if forward else dg.estimator("backprop")
    optimizer = dg.optim.adam(3e-2 if forward else 1e-2)
    runs = {}
    for be in ("jax", "torch"):
        with sdpa_kernel(SDPBackend.MATH):
            runs[be] = dg.fit(
                model, model.init(1, data.example_input), data, estimator=estimator, optimizer=optimizer,
                backend=be, steps=STEPS, batch_size=32, callbacks=[],
            )  # fmt: skip
    losses = {be: np.array([r["loss"] for r in run.history]) for be, run in runs.items()}
    # the same trajectory: the same batches and tangents, the frameworks' rounding apart
    np.testing.assert_allclose(losses["jax"], losses["torch"], rtol=1e-4)
    assert losses["jax"][-3:].mean() < losses["jax"][:3].mean() - 0.05, losses["jax"]
    params = {be: dg.tree.tree_map(dg.backend(be).to_numpy, run.params) for be, run in runs.items()}
    assert sorted(params["jax"]) == sorted(model.trainable_names)  # only the adapters
    for k in params["jax"]:
        scale = np.abs(params["torch"][k]).max()
        np.testing.assert_allclose(
            params["jax"][k], params["torch"][k], rtol=1e-3, atol=1e-4 * scale, err_msg=k
        )
    for k, v in frozen.items():  # every base weight, bitwise
        np.testing.assert_array_equal(model.params[k], v, err_msg=k)
        np.testing.assert_array_equal(base.params[k], v, err_msg=k)

    # the trained adapters folded into a copy of the module (Conv1D's weight is (in, out))
    target = copy.deepcopy(module)
    dg.to_torch(model.merge(params["torch"]), target)
    xt = torch.from_numpy(data.x_test[:8])
    with torch.no_grad():
        merged = target(xt).numpy()
    adapted = model.apply(params["torch"], xt).detach().numpy()
    np.testing.assert_allclose(merged, adapted, rtol=1e-4, atol=1e-4 * np.abs(adapted).max())
