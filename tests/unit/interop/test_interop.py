"""duogard.convert: zero-copy exchange between JAX, PyTorch and NumPy, and each documented rule.

Zero-copy is checked by data pointers (JAX ``unsafe_buffer_pointer()``, torch
``data_ptr()``, NumPy ``ctypes.data``). JAX's 64-bit mode is on here (conftest); the
64-bit-off rules run in a subprocess. CUDA cases are in test_gpu.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import duogard as dg
from duogard.interop import _convert

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
jnp = jax.numpy
ml_dtypes = pytest.importorskip("ml_dtypes")


def ptr(x) -> int:
    if isinstance(x, jax.Array):
        return x.unsafe_buffer_pointer()
    if isinstance(x, torch.Tensor):
        return x.data_ptr()
    return x.ctypes.data


def as_np(x) -> np.ndarray:
    """Values as NumPy, for any framework (bfloat16 widened to float32)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    a = np.asarray(x)
    return a.astype(np.float32) if a.dtype == ml_dtypes.bfloat16 else a


def run_python(code: str, **env) -> str:
    full_env = {**os.environ, **env}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


# ----------------------------------------------------------------------------- zero-copy basics


def test_torch_to_jax_and_back_share_memory():
    t = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    j = dg.convert(t, to="jax")
    assert isinstance(j, jax.Array) and j.dtype == jnp.float32 and j.shape == (4, 5)
    assert ptr(j) == ptr(t)
    np.testing.assert_array_equal(np.asarray(j), t.numpy())
    back = dg.convert(j, to="torch")
    assert ptr(back) == ptr(t)
    assert torch.equal(back, t)


def test_jax_to_torch_shares_memory():
    j = jnp.arange(12, dtype=jnp.float32).reshape(3, 4) * 2
    t = dg.convert(j, to="torch")
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    assert ptr(t) == ptr(j)
    np.testing.assert_array_equal(t.numpy(), np.asarray(j))


def test_tree_structure_scalars_and_numpy_scalars():
    tree = {
        "layer": {"weight": torch.ones(2, 3), "bias": torch.zeros(3)},
        "extra": [torch.arange(3), (np.float32(2.5), 7, 0.5, True)],
    }
    out = dg.convert(tree, to="jax")
    assert dg.tree.tree_structure(out) == dg.tree.tree_structure(tree)
    assert isinstance(out["layer"]["weight"], jax.Array)
    assert ptr(out["layer"]["weight"]) == ptr(tree["layer"]["weight"])
    np_scalar, i, f, b = out["extra"][1]
    assert isinstance(np_scalar, jax.Array) and np_scalar.shape == ()
    assert np_scalar.dtype == jnp.float32
    assert float(np_scalar) == 2.5
    assert (i, f, b) == (7, 0.5, True) and type(i) is int and type(b) is bool  # unchanged


def test_same_framework_is_identity_and_backend_module_target():
    j = jnp.ones(3)
    assert dg.convert(j, to="jax") is j
    t = torch.ones(3)
    same = dg.convert(t, to=dg.backend("torch"))  # a backend module names its framework
    assert ptr(same) == ptr(t)
    assert ptr(dg.convert(t, to=dg.backend("jax"))) == ptr(t)


def test_backend_asarray_goes_through_convert_zero_copy(both):
    jx, th = both
    t = torch.arange(6, dtype=torch.float32)
    assert ptr(jx.asarray(t)) == ptr(t)
    j = jnp.arange(6, dtype=jnp.float32)
    assert ptr(th.asarray(j)) == ptr(j)


# ----------------------------------------------------------------------------- autograd


def test_requires_grad_is_detached_sharing_memory():
    w = torch.randn(3, 4, dtype=torch.float32, requires_grad=True)
    with pytest.raises(BufferError, match="require"):  # why duogard detaches
        jnp.from_dlpack(w)
    j = dg.convert(w, to="jax")
    assert ptr(j) == ptr(w)
    np.testing.assert_array_equal(np.asarray(j), w.detach().numpy())
    assert w.requires_grad  # the caller's tensor is untouched
    t = dg.convert(w, to="torch")
    assert ptr(t) == ptr(w) and not t.requires_grad
    n = dg.convert(w, to="numpy")
    assert ptr(n) == ptr(w)


def test_conjugate_bit_is_resolved():
    z = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)
    zc = z.conj()  # lazy: the conjugate bit, no new memory
    j = dg.convert(zc, to="jax")
    np.testing.assert_array_equal(np.asarray(j), np.conj(z.numpy()))
    with pytest.raises(ValueError, match="conjugate"):
        dg.convert(zc, to="jax", copy=False)


# ----------------------------------------------------------------------------- strides


def test_strided_slice_is_copied_contiguous():
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    view = t[:, ::2]
    with pytest.raises(Exception, match="compact"):  # what JAX does on its own
        jnp.from_dlpack(view)
    j = dg.convert(view, to="jax")
    np.testing.assert_array_equal(np.asarray(j), view.numpy())
    assert ptr(j) != ptr(view)  # a copy, as documented
    with pytest.raises(ValueError, match="strided view"):
        dg.convert(view, to="jax", copy=False)
    # NumPy takes any strides: zero-copy
    n = dg.convert(view, to="numpy")
    assert ptr(n) == ptr(view) and n.strides == (24, 8)


def test_broadcast_view_is_copied():
    row = torch.arange(5, dtype=torch.float32)
    view = row.expand(3, 5)  # stride 0
    j = dg.convert(view, to="jax")
    np.testing.assert_array_equal(np.asarray(j), np.broadcast_to(row.numpy(), (3, 5)))
    with pytest.raises(ValueError, match="stride 0"):
        dg.convert(view, to="jax", copy=False)


def test_transposed_and_permuted_views_stay_zero_copy_and_compute_right():
    t = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
    ref = t.numpy()
    for view, ref_view in ((t[0].T, ref[0].T), (t.permute(2, 0, 1), ref.transpose(2, 0, 1))):
        j = dg.convert(view, to="jax", copy=False)
        assert ptr(j) == ptr(view)
        np.testing.assert_array_equal(np.asarray(j), ref_view)
        # JAX computes with the permuted layout correctly
        np.testing.assert_allclose(np.asarray(j.reshape(-1) * 2 + 1), ref_view.reshape(-1) * 2 + 1)
        np.testing.assert_allclose(np.asarray(jnp.sum(j, axis=0)), ref_view.sum(axis=0))
    mat = dg.convert(t[0].T, to="jax")
    np.testing.assert_allclose(np.asarray(mat @ mat.T), ref[0].T @ ref[0])


# ----------------------------------------------------------------------------- alignment


def test_storage_offset_alignment():
    base = torch.arange(64, dtype=torch.float32)
    assert ptr(base) % 64 == 0  # torch's allocator aligns to 64 bytes
    misaligned, aligned = base[1:9], base[16:24]  # offsets of 4 and 64 bytes
    # JAX on its own copies the misaligned view silently
    assert jnp.from_dlpack(misaligned).unsafe_buffer_pointer() != ptr(misaligned)
    j_mis = dg.convert(misaligned, to="jax")
    assert ptr(j_mis) != ptr(misaligned)
    np.testing.assert_array_equal(np.asarray(j_mis), misaligned.numpy())
    j_al = dg.convert(aligned, to="jax", copy=False)
    assert ptr(j_al) == ptr(aligned)
    np.testing.assert_array_equal(np.asarray(j_al), aligned.numpy())
    with pytest.raises(ValueError, match="not aligned to 64 bytes"):
        dg.convert(misaligned, to="jax", copy=False)
    # a 0-d view at an odd offset, too
    assert float(dg.convert(base[3], to="jax")) == 3.0


# ----------------------------------------------------------------------------- dtypes

DTYPES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex64",
]
SHAPES = [(2, 3), (), (0, 3)]


def _sample(dtype: str, shape) -> torch.Tensor:
    n = int(np.prod(shape))
    base = torch.arange(n, dtype=torch.float64).reshape(shape) - 2
    if dtype == "bool":
        return base.remainder(2) == 1
    if dtype == "uint8":
        base = base + 2
    if dtype == "complex64":
        return torch.complex(base, -base).to(torch.complex64)
    return base.to(getattr(torch, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_round_trips_both_ways(dtype):
    for shape in SHAPES:
        t = _sample(dtype, shape)
        j = dg.convert(t, to="jax")
        assert j.dtype == jnp.dtype(dtype) and j.shape == shape
        back = dg.convert(j, to="torch")
        assert back.dtype == t.dtype and torch.equal(back, t)
        if t.numel():
            assert ptr(j) == ptr(t) and ptr(back) == ptr(t)
        # jax-born arrays too (no NumPy in the middle: NumPy lacks bfloat16)
        j2 = jnp.asarray(j, copy=True)
        t2 = dg.convert(j2, to="torch")
        assert t2.dtype == t.dtype and torch.equal(t2, t)
        assert jnp.array_equal(dg.convert(t2, to="jax"), j2)
        if t.numel():
            assert ptr(t2) == ptr(j2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_to_and_from_numpy(dtype):
    t = _sample(dtype, (2, 3))
    expected = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    n_t = dg.convert(t, to="numpy")
    n_j = dg.convert(dg.convert(t, to="jax", copy=True), to="numpy")
    for n in (n_t, n_j):
        assert n.dtype == expected
        np.testing.assert_array_equal(as_np(n), as_np(t))
    assert ptr(n_t) == ptr(t)
    # and back from NumPy
    t_back = dg.convert(n_t.copy(), to="torch")
    assert t_back.dtype == t.dtype and torch.equal(t_back, t)
    j_back = dg.convert(n_t.copy(), to="jax")
    assert j_back.dtype == jnp.dtype(dtype)
    assert torch.equal(dg.convert(j_back, to="torch"), t)


def test_bfloat16_to_numpy_is_ml_dtypes_and_zero_copy():
    t = torch.tensor([1.5, -2.0, 3.0], dtype=torch.bfloat16)
    n = dg.convert(t, to="numpy")
    assert n.dtype == ml_dtypes.bfloat16 and ptr(n) == ptr(t)
    np.testing.assert_array_equal(n.astype(np.float32), [1.5, -2.0, 3.0])
    j = dg.convert(t, to="jax")
    nj = dg.convert(j, to="numpy")
    assert nj.dtype == ml_dtypes.bfloat16 and ptr(nj) == ptr(j)
    tb = dg.convert(nj.copy(), to="torch")  # ml_dtypes -> torch through an int16 view
    assert tb.dtype == torch.bfloat16 and torch.equal(tb, t)


def test_64_bit_stays_64_bit_with_x64_on():
    for dtype in (torch.float64, torch.int64, torch.complex128):
        t = torch.arange(4).to(dtype)
        j = dg.convert(t, to="jax", copy=False)
        assert str(j.dtype) == str(dtype).removeprefix("torch.") and ptr(j) == ptr(t)


@pytest.mark.integration  # starts a Python process
def test_64_bit_refused_when_jax_x64_is_off():
    out = run_python(
        """
        import numpy as np, torch, jax, jax.numpy as jnp
        import duogard as dg
        assert not jax.config.jax_enable_x64
        # what JAX does on its own: a silent downcast
        assert jnp.from_dlpack(torch.ones(2, dtype=torch.float64)).dtype == jnp.float32
        for leaf in (torch.ones(2, dtype=torch.float64), torch.arange(3), np.ones(2)):
            try:
                dg.convert({"w": leaf}, to="jax")
            except TypeError as exc:
                msg = str(exc)
                assert "64" in msg and "'w'" in msg, msg
                assert "jax_enable_x64" in msg and "allow_downcast=True" in msg, msg
            else:
                raise AssertionError("no error for a 64-bit leaf")
        f64 = torch.tensor([1.25, 2.5], dtype=torch.float64)
        f = dg.convert(f64, to="jax", allow_downcast=True)
        i = dg.convert(torch.tensor([7, -3]), to="jax", allow_downcast=True)
        assert f.dtype == jnp.float32 and f.tolist() == [1.25, 2.5]
        assert i.dtype == jnp.int32 and i.tolist() == [7, -3]
        # int32's own limits fit; one past them would wrap (2**40 -> 0): refused, naming the leaf
        edge = [2**31 - 1, -(2**31)]
        for src in (np.array(edge), torch.tensor(edge)):
            assert dg.convert(src, to="jax", allow_downcast=True).tolist() == edge
        for big in (np.array([2**40, 1]), torch.tensor([-(2**31) - 1]), np.array([2**32], np.uint64)):
            try:
                dg.convert({"w": big}, to="jax", allow_downcast=True)
            except ValueError as exc:
                assert "'w'" in str(exc) and "range" in str(exc) and str(int(big[0])) in str(exc), exc
            else:
                raise AssertionError(f"{big} wrapped around silently")
        try:
            dg.convert(f64, to="jax", allow_downcast=True, copy=False)
        except ValueError as exc:
            assert "downcast" in str(exc)
        else:
            raise AssertionError("copy=False allowed a downcast")
        t32 = torch.ones(3, dtype=torch.float32)
        assert dg.convert(t32, to="jax").unsafe_buffer_pointer() == t32.data_ptr()
        print("x64-off OK")
    """,
        JAX_ENABLE_X64="0",
    )
    assert "x64-off OK" in out


# ----------------------------------------------------------------------------- copy=


@pytest.mark.parametrize(
    "src,to",
    [
        ("torch", "jax"),
        ("jax", "torch"),
        ("torch", "numpy"),
        ("jax", "numpy"),
        ("numpy", "torch"),
        ("numpy", "jax"),
        ("torch", "torch"),
        ("jax", "jax"),
    ],
)
def test_copy_true_shares_nothing(src, to):
    data = np.arange(16, dtype=np.float32).reshape(4, 4)
    make = {
        "torch": lambda: torch.from_numpy(data.copy()),
        "jax": lambda: jnp.asarray(data),
        "numpy": data.copy,
    }
    x = make[src]()
    y = dg.convert(x, to=to, copy=True)
    assert ptr(y) != ptr(x)
    np.testing.assert_array_equal(as_np(y), data)


def test_to_numpy_is_zero_copy():
    t = torch.arange(6, dtype=torch.float32)
    n = dg.convert(t, to="numpy", copy=False)
    assert ptr(n) == ptr(t) and n.flags.writeable  # torch memory is writable
    j = jnp.arange(6, dtype=jnp.float32)
    nj = dg.convert(j, to="numpy", copy=False)
    assert ptr(nj) == ptr(j) and not nj.flags.writeable  # JAX memory is read-only in NumPy


def test_numpy_sources():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = dg.convert(a, to="torch", copy=False)
    assert ptr(t) == ptr(a)
    ro = a.copy()
    ro.flags.writeable = False
    t_ro = dg.convert(ro, to="torch")  # torch has no read-only tensors: a copy
    assert ptr(t_ro) != ptr(ro) and torch.equal(t_ro, torch.from_numpy(a))
    with pytest.raises(ValueError, match="read-only"):
        dg.convert(ro, to="torch", copy=False)
    flipped = a[::-1]
    np.testing.assert_array_equal(dg.convert(flipped, to="torch").numpy(), flipped)
    # NumPy -> JAX: zero-copy only when 64-byte aligned
    buf = np.zeros(64, dtype=np.float32)
    start = (-buf.ctypes.data % 64) // 4
    aligned = buf[start : start + 8]
    aligned[:] = np.arange(8)
    j = dg.convert(aligned, to="jax", copy=False)
    assert ptr(j) == ptr(aligned)
    misaligned = buf[start + 1 : start + 9]
    j2 = dg.convert(misaligned, to="jax")
    assert ptr(j2) != ptr(misaligned)
    np.testing.assert_array_equal(np.asarray(j2), misaligned)


# ----------------------------------------------------------------------------- read-only policy


def test_shared_buffers_are_writable_hence_read_only_by_policy():
    j = jnp.arange(4, dtype=jnp.float32)
    t = dg.convert(j, to="torch")
    t.add_(10)  # forbidden by duogard's policy; shown here to say why
    np.testing.assert_array_equal(np.asarray(j), [10, 11, 12, 13])  # the "immutable" array changed
    own = dg.convert(j, to="torch", copy=True)
    own.mul_(0)  # memory of its own: the JAX array is unaffected
    np.testing.assert_array_equal(np.asarray(j), [10, 11, 12, 13])
    n = dg.convert(j, to="numpy")
    with pytest.raises(ValueError, match="read-only"):
        n[0] = 1


# ----------------------------------------------------------------------------- devices and errors


def test_explicit_cpu_device_is_zero_copy():
    t = torch.ones(8)
    assert ptr(dg.convert(t, to="jax", device="cpu", copy=False)) == ptr(t)
    assert ptr(dg.convert(t, to="jax", device=jax.devices("cpu")[0])) == ptr(t)
    assert ptr(dg.convert(t, to="numpy", device=torch.device("cpu"))) == ptr(t)


def test_device_mismatch_is_an_error(monkeypatch):
    # A CPU-only machine has one device; pretend one leaf lives on cuda:0, to both routes: the
    # fast one (the backend's dlpack_share) and the general one, which raises.
    t_cpu, t_gpu = torch.ones(2), torch.zeros(2)
    real = _convert._device_of
    monkeypatch.setattr(
        _convert, "_device_of", lambda x, *args: ("cuda", 0) if x is t_gpu else real(x, *args)
    )
    th = dg.backend("torch")
    share = th.dlpack_share
    monkeypatch.setattr(th, "dlpack_share", lambda x: (x, ("cuda", 0)) if x is t_gpu else share(x))
    with pytest.raises(ValueError, match=r"different devices.*'a' on cpu.*'b' on cuda:0.*device="):
        dg.convert({"a": t_cpu, "b": t_gpu}, to="jax")


def test_device_that_the_target_cannot_hold():
    with pytest.raises(ValueError, match="NumPy arrays live in host memory"):
        dg.convert(torch.ones(2), to="numpy", device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cannot put torch arrays on cuda:0"):
            dg.convert(jnp.ones(2), to="torch", device="cuda:0")
    if not any(d.platform == "gpu" for d in jax.devices()):
        with pytest.raises(ValueError, match="cannot put jax arrays on cuda:1"):
            dg.convert(torch.ones(2), to="jax", device="gpu:1")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(to="tensorflow"), ValueError, r"to must be one of \['jax', 'torch', 'numpy'\]"),
        (dict(to="jax", copy="yes"), TypeError, "copy must be None, True or False"),
        (dict(to="jax", device="tpu:0"), ValueError, "device must be"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        dg.convert(torch.ones(2), **kwargs)


def test_bad_leaves_name_their_path():
    with pytest.raises(TypeError, match=r"leaf 'a\.b' is a builtins\.str"):
        dg.convert({"a": {"b": "hello"}}, to="torch")

    @jax.jit
    def inside(x):
        return dg.convert(x, to="torch")

    with pytest.raises(TypeError, match="traced JAX value"):
        inside(jnp.ones(2))

    def loss(x):
        dg.convert(x, to="jax")
        return x.sum()

    with pytest.raises(TypeError, match="traced by torch.func"):
        torch.func.grad(loss)(torch.ones(2))


@pytest.mark.integration  # starts a Python process
def test_import_is_lazy():
    out = run_python("""
        import sys, numpy as np
        import duogard, duogard.interop
        out = duogard.convert({"a": np.ones(2), "n": 3}, to="numpy")
        assert out["n"] == 3 and out["a"].shape == (2,)
        print(sorted(m for m in ("jax", "torch") if m in sys.modules))
    """)
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------- the fast route
# convert's default exchange (copy=None, no move) shares plain leaves through the backends'
# dlpack_share/dlpack_importer and keeps what depends only on a type, a dtype or a device; every
# other leaf sends the whole tree down the general route. These check that each kept decision
# follows what it depends on.


def test_dlpack_share_answers_only_plain_arrays(both):
    jx, th = both
    t = torch.arange(64, dtype=torch.float32)
    obj, here = th.dlpack_share(t)
    assert obj is t and here == ("cpu", 0)
    w = torch.ones(4, requires_grad=True)
    obj, _ = th.dlpack_share(w)
    assert not obj.requires_grad and ptr(obj) == ptr(w) and w.requires_grad  # detached, shared
    z = torch.ones(2, dtype=torch.complex64)
    m = t.reshape(8, 8)
    # misaligned, strided, transposed, broadcast, a lazy bit, sparse: the general route's
    for odd in (t[1:9], m[:, ::2], m.T, t[:4].expand(3, 4), z.conj(), t.to_sparse()):
        assert th.dlpack_share(odd) is None
    j = jnp.arange(4.0, dtype=jnp.float32)
    assert jx.dlpack_share(j) == (j, ("cpu", 0))
    seen = []
    jax.jit(lambda x: seen.append(jx.dlpack_share(x)) or x)(j)
    assert seen == [None]  # traced
    assert th.dlpack_importer("float64") is not None and jx.dlpack_importer("float64") is not None  # x64 on


def test_fast_route_shares_plain_leaves_and_general_route_takes_the_rest(monkeypatch):
    th = dg.backend("torch")
    calls = []
    real_export = th.dlpack_export
    monkeypatch.setattr(th, "dlpack_export", lambda x, **kw: calls.append(x) or real_export(x, **kw))
    tree = {"w": torch.ones(3, 4), "b": torch.zeros(4), "n": 3, "s": [0.5, True]}
    out = dg.convert(tree, to="jax")
    assert not calls  # the fast route: no ExportedArray
    assert ptr(out["w"]) == ptr(tree["w"]) and ptr(out["b"]) == ptr(tree["b"])
    assert out["n"] == 3 and out["s"] == [0.5, True]
    # one strided leaf: the whole tree goes the general route; the leaf is copied, the rest shared
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tree["v"] = base[:, ::2]
    out = dg.convert(tree, to="jax")
    assert len(calls) == 4  # each array leaf exported, and the strided one again for its copy
    assert ptr(out["w"]) == ptr(tree["w"]) and ptr(out["v"]) != ptr(tree["v"])
    np.testing.assert_array_equal(np.asarray(out["v"]), tree["v"].numpy())
    # the same tensor again, now a plain one: the fast route again
    calls.clear()
    assert ptr(dg.convert(base, to="jax")) == ptr(base) and not calls


def test_fast_route_kept_decisions_follow_dtype_layout_and_autograd():
    t = torch.arange(6, dtype=torch.float32)
    assert ptr(dg.convert(t, to="jax")) == ptr(t)  # float32 now known
    for dtype in (torch.bool, torch.int8, torch.uint8, torch.bfloat16, torch.float64, torch.complex64):
        u = t.to(dtype)
        j = dg.convert({"u": u, "t": t}, to="jax")
        assert str(j["u"].dtype) == str(dtype).removeprefix("torch.") and ptr(j["u"]) == ptr(u)
        back = dg.convert(j, to="torch")
        assert back["u"].dtype == dtype and ptr(back["u"]) == ptr(u)
    assert float(dg.convert(torch.tensor(2.5), to="jax")) == 2.5  # 0-d
    # a dtype convert does not move, after those it does: still refused, naming the leaf
    with pytest.raises(TypeError, match=r"leaf 'q' is of dtype float8_e4m3fn"):
        dg.convert({"t": t, "q": t.to(torch.float8_e4m3fn)}, to="jax")
    # leaf after leaf of one kind (a tree reuses the previous leaf's kind): a new dtype, a strided view
    with pytest.raises(TypeError, match=r"leaf 'b' is of dtype float8_e4m3fn"):
        dg.convert({"a": t, "b": t.to(torch.float8_e4m3fn)}, to="jax")
    m = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    j = dg.convert({"a": t, "b": m, "c": m[:, ::2], "d": m.double()}, to="jax")
    assert ptr(j["a"]) == ptr(t) and ptr(j["b"]) == ptr(m) and ptr(j["c"]) != ptr(m)
    assert j["d"].dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(j["c"]), m[:, ::2].numpy())
    # the same tensor, requiring grad after a plain conversion: detached, and still requiring grad
    t.requires_grad_()
    j = dg.convert(t, to="jax")
    assert ptr(j) == ptr(t) and t.requires_grad
    # a complex tensor shared, then its lazy conjugate: resolved (a copy), not shared
    z = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)
    assert ptr(dg.convert(z, to="jax")) == ptr(z)
    zc = dg.convert(z.conj(), to="jax")
    np.testing.assert_array_equal(np.asarray(zc), np.conj(z.numpy()))
    # JAX -> torch: a torch result never requires grad, and a JAX array stays itself
    a = jnp.arange(3.0, dtype=jnp.float32)
    assert not dg.convert(a, to="torch").requires_grad and dg.convert(a, to="jax") is a


def test_fast_route_still_refuses_traced_values_after_concrete_ones():
    j = jnp.ones(2, dtype=jnp.float32)
    dg.convert(j, to="torch")  # ArrayImpl known as concrete
    with pytest.raises(TypeError, match="traced JAX value"):
        jax.jit(lambda x: dg.convert(x, to="torch"))(j)
    with pytest.raises(TypeError, match="traced JAX value"):
        jax.grad(lambda x: dg.convert({"x": x}, to="torch") and x.sum())(j)
    t = torch.ones(2)
    dg.convert(t, to="jax")  # torch.Tensor known
    with pytest.raises(TypeError, match="traced by torch.func"):
        torch.func.grad(lambda x: dg.convert(x, to="jax") and x.sum())(t)


@pytest.mark.integration  # starts a Python process
def test_fast_route_sees_the_64_bit_mode_switch_between_calls():
    out = run_python(
        """
        import torch, jax
        import duogard as dg
        f64 = torch.ones(2, dtype=torch.float64)
        jax.config.update("jax_enable_x64", True)
        assert dg.convert(f64, to="jax").dtype == "float64"
        jax.config.update("jax_enable_x64", False)
        try:
            dg.convert({"w": f64}, to="jax")
        except TypeError as exc:
            assert "'w'" in str(exc) and "64-bit mode" in str(exc)
        else:
            raise AssertionError("float64 silently narrowed after x64 was switched off")
        assert dg.convert(f64, to="jax", allow_downcast=True).dtype == "float32"
        jax.config.update("jax_enable_x64", True)
        assert dg.convert(f64, to="jax").dtype == "float64"
        print("switch OK")
    """,
        JAX_ENABLE_X64="0",
    )
    assert "switch OK" in out


@pytest.mark.integration  # starts a Python process
def test_fast_route_devices_per_sharding():
    out = run_python(
        """
        import numpy as np, jax, jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec
        import duogard as dg
        d0, d1 = jax.devices("cpu")[:2]
        one = jax.device_put(jnp.arange(4.0), d0)
        t = dg.convert(one, to="torch")
        assert t.data_ptr() == one.unsafe_buffer_pointer()
        # the second host device: still host memory, a new sharding learnt
        other = jax.device_put(jnp.arange(4.0) + 1, d1)
        assert dg.convert(other, to="torch").tolist() == [1.0, 2.0, 3.0, 4.0]
        # sharded over both: refused by the general route, after single-device ones were shared
        mesh = Mesh(np.array([d0, d1]), ("x",))
        spread = jax.device_put(jnp.arange(4.0), NamedSharding(mesh, PartitionSpec("x")))
        try:
            dg.convert({"p": spread}, to="torch")
        except ValueError as exc:
            assert "sharded over 2 devices" in str(exc)
        else:
            raise AssertionError("a sharded array was exchanged")
        print("devices OK")
    """,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
    )
    assert "devices OK" in out
