"""Hugging Face models with tied weights ported with from_torch (issue 28): GPT-2 (its default
sdpa attention), T5 and Whisper in tiny configs built from their configs (random weights, no
download). Each ports through torch.export, gives torch's logits on JAX, moves its output as
torch's does when any single trainable parameter is perturbed (the tied embedding included:
it used to be read under another name), trains the tied weight on both backends, and goes back
into the module still tied."""

from __future__ import annotations

import numpy as np
import pytest

import duogard as dg

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
tr = pytest.importorskip(
    "transformers", reason="the Hugging Face zoo tests need transformers (pip install transformers)"
)
import jax.numpy as jnp  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from duogard.interop import from_torch, to_torch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


class LM(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(input_ids=x, use_cache=False).logits


class Seq2Seq(LM):
    def forward(self, x):
        return self.m(input_ids=x, decoder_input_ids=x[:, :4], use_cache=False).logits


class Speech(LM):
    def forward(self, x):  # (N, mel bins, frames)
        # not the padding token: torch's backward leaves its embedding row out (padding_idx)
        # while its forward mode (and JAX's both modes) count that row's use
        ids = torch.arange(3, 7).expand(x.shape[0], 4)
        return self.m(input_features=x, decoder_input_ids=ids, use_cache=False).logits


def _gpt2():
    config = tr.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    return (
        LM(tr.GPT2LMHeadModel(config)),
        torch.randint(0, 50, (2, 6)),
        ("transformer.wte.weight", "lm_head.weight"),
    )


def _t5():
    config = tr.T5Config(
        vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    return (
        Seq2Seq(tr.T5ForConditionalGeneration(config)),
        torch.randint(0, 50, (2, 6)),
        ("shared.weight", "lm_head.weight"),
    )


def _whisper():
    config = tr.WhisperConfig(
        vocab_size=50,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=8,
        max_source_positions=4,
        max_target_positions=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    model = tr.WhisperForConditionalGeneration(config)
    return Speech(model), torch.randn(2, 8, 8), ("model.decoder.embed_tokens.weight", "proj_out.weight")


MODELS = {"gpt2": _gpt2, "t5": _t5, "whisper": _whisper}


@pytest.mark.parametrize("name", list(MODELS))
def test_tied_hugging_face_model_ports_perturbs_trains_and_goes_back_tied(name):
    tr.logging.set_verbosity_error()
    torch.manual_seed(0)
    module, x, (embedding, head) = MODELS[name]()
    module.eval()
    model = from_torch(module, x)  # raised torch's functional_call tie error before
    embedding, head = f"m.{embedding}", f"m.{head}"
    assert head in model.tied[embedding] and head not in model.params and embedding in model.trainable()
    xj = jnp.asarray(x.numpy())
    with torch.no_grad():
        ref = module(x).numpy()
    out = np.asarray(jax.jit(model.apply)(model.params, xj))  # one compile, not one per operator
    assert model.lowered_path == "export", model.lowered_fallback_reason
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * scale)

    # every trainable parameter, perturbed alone, moves the output as torch's does
    primals = model.trainable()
    pj = {k: jnp.asarray(v) for k, v in primals.items()}
    pt = {k: torch.from_numpy(v) for k, v in primals.items()}
    jvp = jax.jit(lambda t: jax.jvp(lambda q: model.apply(q, xj), (pj,), (t,))[1])
    rng = np.random.default_rng(1)
    for k in primals:
        t = {
            n: np.zeros_like(v) if n != k else rng.normal(size=v.shape).astype(np.float32)
            for n, v in primals.items()
        }
        with sdpa_kernel(SDPBackend.MATH):  # torch's fused attention has no forward-mode rule
            want = torch.func.jvp(
                lambda q: torch.func.functional_call(module, q, (x,)),
                (pt,),
                ({n: torch.from_numpy(v) for n, v in t.items()},),
            )[1].numpy()
        got = np.asarray(jvp({n: jnp.asarray(v) for n, v in t.items()}))
        np.testing.assert_allclose(
            got, want, rtol=1e-4, atol=1e-4 * max(float(np.abs(want).max()), 1e-3), err_msg=k
        )

    # one training step changes the tied weight, on both backends alike
    target = rng.integers(0, 50, size=ref.shape[:-1])

    def loss_fn(p, b):
        logits = model.apply(p, b[0])
        return dg.losses.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[1].reshape(-1))

    grads = {}
    backprop = dg.estimator("backprop")
    for be in (dg.backend("jax"), dg.backend("torch")):
        step = lambda p, b: backprop(loss_fn, p, b)  # noqa: E731
        step = jax.jit(step) if be.name == "jax" else step
        with sdpa_kernel(SDPBackend.MATH):
            _, g = step(
                {k: be.asarray(v) for k, v in primals.items()}, (be.asarray(x.numpy()), be.asarray(target))
            )
        grads[be.name] = be.to_numpy(g[embedding])
    assert np.abs(grads["jax"]).max() > 0
    np.testing.assert_allclose(
        grads["jax"], grads["torch"], rtol=1e-4, atol=1e-4 * np.abs(grads["torch"]).max()
    )
    trained = {**model.params, embedding: primals[embedding] - 0.1 * grads["jax"]}

    to_torch(trained, module)
    names = dict(module.named_parameters(remove_duplicate=False))
    assert names[head] is names[embedding]
    np.testing.assert_array_equal(names[head].detach().numpy(), trained[embedding])
