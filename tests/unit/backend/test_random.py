"""The portable generator (duogard.backend._philox): the specification against published test
vectors, each backend against the specification, and the two backends against each other."""

import numpy as np
import pytest

import duogard as dg
from duogard.backend import _philox as spec

# Random123's known-answer vectors for philox4x32_10 (kat_vectors): counter, key, output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,want", KAT)
def test_spec_matches_random123_known_answers(counter, key, want):
    assert tuple(int(w) for w in spec.philox4x32(counter, key).ravel()) == want


def test_spec_normal_and_signs_have_the_right_moments():
    z = spec.normal(spec.key_words(11), 200_001)
    assert z.shape == (200_001,) and z.dtype == np.float32
    assert abs(z.mean()) < 0.01 and abs(z.var() - 1) < 0.015 and abs((z**4).mean() - 3) < 0.08
    s = spec.rademacher(spec.key_words(11), 100_003)
    assert set(np.unique(s)) == {-1.0, 1.0} and abs(s.mean()) < 0.015
    u = spec.uniform(spec.key_words(11), 100_000)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.005


def _np(be, x):
    return np.asarray(be.to_numpy(x))


def test_keys_split_and_fold_in_follow_the_spec(be):
    k = be.key(2**40 + 5)
    np.testing.assert_array_equal(be.key_data(k), spec.key_words(2**40 + 5))
    np.testing.assert_array_equal(be.key_data(be.split(k, 3)), spec.split_words(spec.key_words(2**40 + 5), 3))
    for data in (0, 1, 12345678901, 2**63 + 3):
        got = be.key_data(be.fold_in(k, data))
        np.testing.assert_array_equal(got, spec.fold_in_words(spec.key_words(2**40 + 5), data))


@pytest.mark.parametrize("n", [1, 6, 33, 1001])
def test_portable_draws_follow_the_spec(be, n):
    k, ref = be.fold_in(be.key(3), 9), spec.fold_in_words(spec.key_words(3), 9)
    np.testing.assert_array_equal(_np(be, be.rademacher(k, (n,))), spec.rademacher(ref, n))
    np.testing.assert_array_equal(_np(be, be.uniform(k, (n,))), spec.uniform(ref, n))
    np.testing.assert_array_equal(_np(be, be.bernoulli(k, 0.3, (n,))), spec.uniform(ref, n) < 0.3)
    np.testing.assert_allclose(_np(be, be.normal(k, (n,))), spec.normal(ref, n), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(
        _np(be, be.normal(k, (n,), dtype="float64")), spec.normal(ref, n, np.float64), rtol=1e-13, atol=1e-13
    )
    # a shape is the flat draw in row-major order; draw_rows blocks are draws of (rows, size)
    np.testing.assert_array_equal(_np(be, be.rademacher(k, (n, 2))).ravel(), spec.rademacher(ref, 2 * n))
    rows = _np(be, be.draw_rows("rademacher", [k, be.key(1)], [n, 3], 2))
    np.testing.assert_array_equal(rows[:, :n].ravel(), spec.rademacher(ref, 2 * n))


def test_jax_keys_and_draws_trace_under_jit():
    jax = pytest.importorskip("jax")
    bj = dg.backend("jax")

    @jax.jit
    def f(key, step):
        k = bj.fold_in(key, step)
        return bj.split(k, 2), bj.normal(k, (5,)), bj.rademacher(k, (40,))

    ks, z, s = f(bj.key(4), np.int32(17))
    ref = spec.fold_in_words(spec.key_words(4), 17)
    np.testing.assert_array_equal(np.asarray(ks), spec.split_words(ref, 2))
    np.testing.assert_allclose(np.asarray(z), spec.normal(ref, 5), rtol=2e-6, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(s), spec.rademacher(ref, 40))


def test_the_backends_draw_the_same_tangents(both):
    """The same seed gives the same numbers on JAX and torch (what `duogard compare` relies on)."""
    bj, bt = both
    kj, kt = bj.fold_in(bj.key(0), 5), bt.fold_in(bt.key(0), 5)
    np.testing.assert_array_equal(_np(bj, bj.rademacher(kj, (4, 33))), _np(bt, bt.rademacher(kt, (4, 33))))
    np.testing.assert_allclose(
        _np(bj, bj.normal(kj, (999,))), _np(bt, bt.normal(kt, (999,))), rtol=2e-6, atol=2e-6
    )


def test_native_generator_is_an_option_and_bad_names_are_refused(be):
    k = be.key(0)
    native = _np(be, be.normal(k, (64,), generator="native"))
    assert not np.allclose(native, _np(be, be.normal(k, (64,))))
    np.testing.assert_array_equal(native, _np(be, be.normal(k, (64,), generator="native")))
    assert set(np.unique(_np(be, be.rademacher(k, (64,), generator="native")))) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="generator must be one of"):
        be.normal(k, (3,), generator="philox")


def test_long_draws_follow_the_spec_across_chunks(be):
    """torch computes the words a chunk of counters at a time: the seams must not show."""
    n = 4 * (1 << 15) * 2 + 11
    ref = spec.key_words(8)
    np.testing.assert_array_equal(_np(be, be.uniform(be.key(8), (n,))), spec.uniform(ref, n))


def test_jax_keys_derived_on_the_host_equal_the_traced_rounds():
    """A concrete key's fold_in / split run the NumPy specification on the host (fast in a
    training loop); under jit the rounds are traced: both give the same words.
    """
    jax = pytest.importorskip("jax")
    be = dg.backend("jax")
    key = be.key(11)
    for data in (0, 7, 2**40 + 3, -1):
        eager = np.asarray(be.fold_in(key, data))
        traced = np.asarray(jax.jit(lambda k, d=data: be.fold_in(k, d))(key))
        np.testing.assert_array_equal(eager, traced)
    for num in (1, 2, 5, 9):
        np.testing.assert_array_equal(
            np.asarray(be.split(key, num)), np.asarray(jax.jit(lambda k, n=num: be.split(k, n))(key))
        )


def test_batched_draws_equal_one_draw_per_key(be):
    """A model's leaves are drawn in one pass (``draw_rows`` batches the blocks under 2^16
    numbers, each element with its own key; ``fold_in_many`` derives the leaf keys at once):
    the spec's batched form, each backend eagerly and (JAX) under jit, give every key's own
    numbers. Odd sizes check the dropped last normal and the part-used sign word."""
    root = spec.key_words(21)
    data = [0, 1, 2, 7, 2**33 + 1]
    words = spec.fold_in_many_words(root, data)
    np.testing.assert_array_equal(words, np.stack([spec.fold_in_words(root, d) for d in data]))
    np.testing.assert_array_equal(be.key_data(be.fold_in_many(be.key(21), data)), words)
    counts = [1, 3, 64, 33, 101]
    for kind, one in (("normal", spec.normal), ("rademacher", spec.rademacher), ("uniform", spec.uniform)):
        ref = np.concatenate([one(w, n) for w, n in zip(words, counts)])
        np.testing.assert_array_equal(spec.draw_many(kind, words, counts), ref)
    sizes = [1, 3, 32, 33, 50]
    keys = list(be.fold_in_many(be.key(21), data))
    draws = {"eager": lambda kind: be.draw_rows(kind, keys, sizes, 2)}
    if be.name == "jax":
        import jax

        draws["jit"] = lambda kind: jax.jit(lambda ks: be.draw_rows(kind, list(ks), sizes, 2))(
            be.fold_in_many(be.key(21), data)
        )
    for how, draw in draws.items():
        for kind, one in (("normal", spec.normal), ("rademacher", spec.rademacher)):
            got, start = _np(be, draw(kind)), 0
            assert got.shape == (2, sum(sizes)), how
            for w, size in zip(words, sizes):
                want = one(w, 2 * size).reshape(2, size)
                np.testing.assert_allclose(
                    got[:, start : start + size], want, rtol=2e-6, atol=2e-6, err_msg=how
                )
                start += size


def test_jax_fold_in_many_traced_equals_the_host_words():
    jax = pytest.importorskip("jax")
    be = dg.backend("jax")
    key = be.key(5)
    traced = jax.jit(lambda k: be.fold_in_many(k, [0, 3, 2**40]))(key)
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(be.fold_in_many(key, [0, 3, 2**40])))


def test_stage_hands_a_batch_to_compiled_steps_at_least_cost(be):
    """``stage``: JAX keeps the NumPy array (jit transfers it itself); torch makes a tensor
    sharing its memory; anything else goes through ``asarray``."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    staged = be.stage(x)
    if be.name == "jax":
        assert staged is x
    else:
        assert be.is_array(staged) and np.shares_memory(be.to_numpy(staged), x)
    np.testing.assert_array_equal(_np(be, be.stage([1.0, 2.0])), [1.0, 2.0])


# ----------------------------------------------------------------------------- every dtype (issue 26)

DTYPES = ["float16", "bfloat16", "float32", "float64"]
# a draw's numbers as float64, one entry per draw the library makes: the plain draws, and
# draw_rows (the forward estimators' tangents, dense and rank-1 factors) with a large block
# and small ones (torch draws small portable blocks together on the host)
N = 40_001  # above torch's host-draw threshold (2**14 words) for normal and uniform
DRAWS = {
    "normal": lambda be, k, dt, g: be.normal(k, (N,), dtype=dt, generator=g),
    "uniform": lambda be, k, dt, g: be.uniform(k, (N,), dtype=dt, generator=g),
    "rademacher": lambda be, k, dt, g: be.rademacher(k, (N,), dtype=dt, generator=g),
    "small normal": lambda be, k, dt, g: be.normal(k, (2, 999), dtype=dt, generator=g),
    "draw_rows normal": lambda be, k, dt, g: be.draw_rows(
        "normal", [k, be.fold_in(k, 1), be.fold_in(k, 2)], [N // 2, 33, 1000], 2, dtype=dt, generator=g
    ),
    "draw_rows rademacher": lambda be, k, dt, g: be.draw_rows(
        "rademacher", [k, be.fold_in(k, 1)], [N, 33], 2, dtype=dt, generator=g
    ),
}
MOMENTS = {"uniform": (0.5, 1 / 12), "rademacher": (0.0, 1.0)}  # mean, variance; else normal's


def _float64(be, x, dtype):
    assert be.dtype_name(x.dtype) == dtype
    return np.asarray(be.to_numpy(x)).astype(np.float64)


def _spec_draw(name, dtype):
    """The specification's numbers of ``DRAWS[name]`` under key ``fold_in(key(3), 9)``."""
    dtype = np.dtype(dtype)
    root = spec.fold_in_words(spec.key_words(3), 9)
    if name == "small normal":
        return spec.normal(root, 2 * 999, dtype).reshape(2, 999)
    if name.startswith("draw_rows"):
        one = spec.normal if name.endswith("normal") else spec.rademacher
        keys = [root, spec.fold_in_words(root, 1), spec.fold_in_words(root, 2)]
        sizes = [N // 2, 33, 1000] if name.endswith("normal") else [N, 33]
        return np.concatenate([one(k, 2 * s, dtype).reshape(2, s) for k, s in zip(keys, sizes)], axis=1)
    return getattr(spec, name)(root, N, dtype)


# the portable normal numbers of two libraries differ in the last bit of float32 (log, cos,
# sin); rounded to float16 or bfloat16 they may round apart by one of its last bits
NORMAL_TOL = {
    "float16": dict(rtol=2**-10, atol=2**-14),
    "bfloat16": dict(rtol=2**-7, atol=2**-14),
    "float32": dict(rtol=2e-6, atol=2e-6),
    "float64": dict(rtol=1e-13, atol=1e-13),
}


@pytest.mark.parametrize("generator", ["portable", "native"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("draw", list(DRAWS))
def test_every_draw_in_every_dtype_is_finite_with_the_right_moments(be, draw, dtype, generator):
    """float16 and bfloat16 draws are the float32 ones rounded: finite, in range, the right
    mean and variance (float16's own arithmetic overflowed: NaN normals, infinite uniforms)."""
    got = _float64(be, DRAWS[draw](be, be.fold_in(be.key(3), 9), dtype, generator), dtype)
    assert np.isfinite(got).all()
    kind = draw.split()[-1]
    mean, var = MOMENTS.get(kind, (0.0, 1.0))
    tol = 0.1 if draw == "small normal" else 0.03  # several standard errors of 2,000 / 40,000+ numbers
    assert abs(got.mean() - mean) < tol * np.sqrt(var) and abs(got.var() - var) < 2 * tol * var
    if kind == "uniform":  # [0, 1); the portable generator's in the open interval
        assert got.min() >= 0 and got.max() < 1 and (got.min() > 0 or generator == "native")
    if kind == "rademacher":
        assert set(np.unique(got)) == {-1.0, 1.0}
    if kind == "normal":
        assert np.abs(got).max() < 6.5  # Box-Muller's largest is sqrt(-2 log 2**-24) = 5.77


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("draw", list(DRAWS))
def test_every_portable_draw_in_every_dtype_follows_the_spec_on_both_backends(both, draw, dtype):
    """Signs and uniforms equal bit for bit in every dtype (the float32 numbers rounded the same
    way), normals to float rounding, on each backend, against the spec and each other."""
    got = [_float64(b, DRAWS[draw](b, b.fold_in(b.key(3), 9), dtype, "portable"), dtype) for b in both]
    want = _spec_draw(draw, dtype).astype(np.float64)
    for g in got:
        if draw.endswith("normal"):
            np.testing.assert_allclose(g, want, **NORMAL_TOL[dtype])
        else:
            np.testing.assert_array_equal(g, want)
    if draw.endswith("normal"):
        np.testing.assert_allclose(got[0], got[1], **NORMAL_TOL[dtype])
    else:
        np.testing.assert_array_equal(got[0], got[1])


_MLP = dg.grad.supervised(
    dg.nn.Sequential(dg.nn.Linear(4), dg.nn.tanh, dg.nn.Linear(2)), dg.losses.cross_entropy
)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    "options",
    [{}, {"distribution": "rademacher"}, {"tangents": "rank1"}],
    ids=["normal", "rademacher", "rank1"],
)
def test_a_forward_gradient_with_half_precision_params_is_finite(be, dtype, options):
    """A forward-gradient step with float16 / bfloat16 params draws its tangents in that dtype:
    a finite estimate, close to the float32 one of the same key (the same tangents, rounded)."""
    x = np.random.default_rng(0).normal(size=(4, 3))
    params_np = _MLP.model.init(0, x, dtype="float32")
    est = dg.estimator("forward", num_tangents=2, **options)

    def grads(dt):
        params = dg.tree.tree_map(lambda a: be.asarray(a, dtype=dt), params_np)
        batch = (be.asarray(x.astype(np.float32), dtype=dt), be.asarray(np.array([0, 1, 1, 0])))
        loss, g = est(_MLP, params, batch, be.key(0))
        leaves = dg.tree.tree_leaves(g)
        assert all(be.dtype_name(a.dtype) == dt for a in leaves)
        return float(loss), np.concatenate([_np(be, a).astype(np.float64).ravel() for a in leaves])

    loss, g = grads(dtype)
    loss32, g32 = grads("float32")
    assert np.isfinite(loss) and np.isfinite(g).all()
    assert np.linalg.norm(g - g32) < 0.05 * np.linalg.norm(g32)


@pytest.mark.integration
def test_torch_compiled_draws_follow_the_spec(monkeypatch):
    """Large portable normal and sign draws on a CPU run kernels compiled by torch.compile (the
    rounds fused with Box-Muller or the bit unpacking): the spec's numbers, as the eager path's.
    The size threshold is lowered here so that a small draw takes that path (two compilations)."""
    pytest.importorskip("torch")
    from duogard_torch import _random as torch_random

    bt = dg.backend("torch")
    monkeypatch.setattr(torch_random, "_COMPILE_MIN", 1 << 14)
    n = 20_003  # above the host draws' 2**14 words, odd, not a whole block
    k, ref = bt.fold_in(bt.key(3), 9), spec.fold_in_words(spec.key_words(3), 9)
    compiled = {
        "normal": _np(bt, bt.normal(k, (n,))),
        "signs": _np(bt, bt.rademacher(k, (n,))),
        "normal float16": _np(bt, bt.normal(k, (n,), dtype="float16")),
    }
    assert {kind for kind, kernel in torch_random._KERNELS.items() if kernel is not None} >= {
        ("normal", bt.as_dtype("float32")),
        ("signs", bt.as_dtype("float32")),
    }
    np.testing.assert_allclose(compiled["normal"], spec.normal(ref, n), rtol=2e-6, atol=2e-6)
    np.testing.assert_array_equal(compiled["signs"], spec.rademacher(ref, n))
    np.testing.assert_allclose(
        compiled["normal float16"], spec.normal(ref, n, np.float16), **NORMAL_TOL["float16"]
    )
    monkeypatch.setenv("DUOGARD_COMPILE_DRAWS", "0")  # the eager path: the same numbers
    np.testing.assert_allclose(_np(bt, bt.normal(k, (n,))), compiled["normal"], rtol=2e-6, atol=2e-6)
    np.testing.assert_array_equal(_np(bt, bt.rademacher(k, (n,))), compiled["signs"])


@pytest.mark.parametrize("path", ["host", "compiled"])
def test_draws_under_the_step_memory_tracker_are_counted_and_keep_compiled_draws_on(
    monkeypatch, recwarn, path
):
    """measure_step_memory runs a step under a dispatch mode. A draw of the host kernel is
    written into a tensor torch allocates, so the tracker counts it (a NumPy array wrapped by
    torch.from_numpy was invisible to it: the torch figure left the tangents out); a large draw
    that would be compiled runs eagerly there (torch.compile refuses the mode), with the spec's
    numbers, without a warning and without switching compiled draws off for the process (it
    did both)."""
    pytest.importorskip("torch")
    from duogard_torch import _random as torch_random

    bt = dg.backend("torch")
    monkeypatch.setattr(torch_random, "_COMPILE_MIN", 1 << 14)
    monkeypatch.setattr(torch_random, "_KERNELS", {})
    if path == "compiled":
        monkeypatch.setattr(torch_random, "_host_limit", lambda device: 0)
    n, k = 20_003, bt.fold_in(bt.key(3), 9)
    out = []
    assert bt.step_memory(lambda: out.append(bt.normal(k, (n,)))) >= 4 * n
    np.testing.assert_allclose(
        _np(bt, out[0]), spec.normal(spec.fold_in_words(spec.key_words(3), 9), n), rtol=2e-6, atol=2e-6
    )
    assert not [w for w in recwarn if "torch.compile" in str(w.message)]
    assert None not in torch_random._KERNELS.values()  # nothing switched off
