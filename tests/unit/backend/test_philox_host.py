"""The portable generator's host kernel (duogard.backend._philox_host) against the NumPy
specification: words, uniform numbers and signs bit for bit, normal numbers to float rounding,
over many keys at once, every count's edge (zero, odd, a partial block, a chunk's boundary)."""

import shutil
import sysconfig

import numpy as np
import pytest

from duogard.backend import _philox as spec
from duogard.backend import _philox_host as host

needs_kernel = pytest.mark.skipif(host.kernel() is None, reason="the Philox kernel is not built here")

# counts at every edge: none, one, odd, a partial block, a chunk's 256 words, many chunks
COUNTS = [0, 1, 3, 4, 5, 127, 128, 129, 255, 256, 257, 1001, 4096, 70_001]


def _keys(n, seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 2**32, (n, 2), dtype=np.uint64).astype(np.uint32)
    keys[0] = (0, 0)
    keys[1] = (0xFFFFFFFF, 0xFFFFFFFF)
    return keys


def test_the_kernel_is_built_where_a_c_compiler_is():
    # the install builds it (pyproject.toml's optional extension); a silent failure would leave
    # every torch draw on the slow NumPy path
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}): the kernel is optional")
    assert host.kernel() is not None


@needs_kernel
def test_words_and_uniform_and_signs_are_the_specs_bit_for_bit():
    keys = _keys(len(COUNTS))
    for k, n in zip(keys, COUNTS):
        np.testing.assert_array_equal(host.words(tuple(k), n), spec.words(tuple(k), n), err_msg=f"n={n}")
    for kind in ("uniform", "rademacher"):
        for dtype in (np.float32, np.float64):
            got = host.draw_many(kind, keys, COUNTS, dtype)
            assert got.dtype == dtype and got.shape == (sum(COUNTS),)
            np.testing.assert_array_equal(got, spec.draw_many(kind, keys, COUNTS, dtype), err_msg=kind)


@needs_kernel
def test_normal_numbers_are_the_specs_to_float_rounding():
    keys = _keys(len(COUNTS), seed=1)
    got = host.draw_many("normal", keys, COUNTS, np.float32)
    want = spec.draw_many("normal", keys, COUNTS, np.float32)
    assert got.dtype == np.float32
    # the kernel's float32 log, cos and sin are polynomials: a few ulp from NumPy's
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    assert np.mean(got == want) > 0.5  # most numbers are exactly the reference's
    got64 = host.draw_many("normal", keys, COUNTS, np.float64)
    np.testing.assert_allclose(
        got64, spec.draw_many("normal", keys, COUNTS, np.float64), rtol=1e-13, atol=1e-13
    )


@needs_kernel
def test_normal_numbers_hold_over_the_whole_range_of_words():
    # two million numbers: u from 2**-24 (the tail, |z| ~ 5.8) to 1 - 2**-24, t over [0, 2 pi]
    # (every quadrant of the polynomial sine and cosine)
    key = spec.key_words(123)
    got, want = host.draw_many("normal", [key], [2_000_000]), spec.normal(key, 2_000_000)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    assert np.abs(got).max() > 4.5
    assert abs(got.mean()) < 0.003 and abs(got.var() - 1) < 0.003


@needs_kernel
def test_fold_in_many_is_the_specs():
    for key in ((0, 0), (0xFFFFFFFF, 0xFFFFFFFF), (12345, 678)):
        data = [0, 1, 7, 2**32 - 1, 2**32, 2**63 + 5, 2**64 - 1]
        np.testing.assert_array_equal(
            host.fold_in_many(key, data), spec.fold_in_many_words(key, data).astype(np.int64)
        )
        assert host.fold_in_many(key, data).dtype == np.int64
    assert host.fold_in_many((1, 2), []).shape == (0, 2)


def test_switched_off_it_is_the_specification(monkeypatch):
    monkeypatch.setenv("DUOGARD_PHILOX_KERNEL", "0")
    assert host.kernel() is None
    keys = _keys(3, seed=2)
    np.testing.assert_array_equal(
        host.draw_many("normal", keys, [5, 0, 300]), spec.draw_many("normal", keys, [5, 0, 300])
    )
    np.testing.assert_array_equal(host.words(tuple(keys[0]), 9), spec.words(tuple(keys[0]), 9))
    np.testing.assert_array_equal(host.fold_in_many((3, 4), [1, 2]), spec.fold_in_many_words((3, 4), [1, 2]))


@needs_kernel
def test_bad_draws_are_refused_with_the_arguments_named():
    with pytest.raises(ValueError, match="2 keys for 3 counts"):
        host.draw_many("normal", _keys(2), [1, 2, 3])
    with pytest.raises(ValueError, match="negative count"):
        host.draw_many("normal", _keys(2), [1, -2])


@needs_kernel
def test_the_torch_backend_draws_on_the_kernel_the_specs_numbers():
    torch = pytest.importorskip("torch")
    import duogard as dg

    be = dg.backend("torch")
    k, ref = be.fold_in(be.key(5), 3), spec.fold_in_words(spec.key_words(5), 3)
    for n in (7, 20_000, 300_001):  # under the old host limit, over it, a medium draw
        np.testing.assert_allclose(be.to_numpy(be.normal(k, (n,))), spec.normal(ref, n), rtol=2e-6, atol=2e-6)
        np.testing.assert_array_equal(be.to_numpy(be.rademacher(k, (n,))), spec.rademacher(ref, n))
        np.testing.assert_array_equal(be.to_numpy(be.uniform(k, (n,))), spec.uniform(ref, n))
    half = be.normal(k, (1001,), dtype="float16")
    assert half.dtype == torch.float16
    np.testing.assert_array_equal(be.to_numpy(half), spec.normal(ref, 1001, np.float32).astype(np.float16))


def test_without_the_kernel_the_torch_draws_are_unchanged(monkeypatch):
    pytest.importorskip("torch")
    import duogard as dg

    be = dg.backend("torch")
    k, ref = be.key(9), spec.key_words(9)
    monkeypatch.setenv("DUOGARD_PHILOX_KERNEL", "0")  # read at every draw
    assert host.kernel() is None
    for n in (5, 20_000):
        np.testing.assert_allclose(be.to_numpy(be.normal(k, (n,))), spec.normal(ref, n), rtol=2e-6, atol=2e-6)
        np.testing.assert_array_equal(be.to_numpy(be.rademacher(k, (n,))), spec.rademacher(ref, n))
