"""Checkpoint files: every dtype bitwise (bfloat16 too), and damaged manifests fail clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from duogard.train import CheckpointError
from duogard.train.checkpoint import MANIFEST, load_checkpoint, save_checkpoint

# ----------------------------------------------------------------------------- dtypes

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "float16", "bfloat16", "float32", "float64"]
DTYPES += ["complex64", "complex128"]  # complex128: torch only, refused on save


def _value(name: str) -> np.ndarray:
    """A NumPy array of dtype ``name`` (bfloat16: float32 values, cast by the backend)."""
    if name == "bool":
        return np.array([True, False, True])
    if name.startswith(("int", "uint")):
        info = np.iinfo(name)
        return np.array([info.min, 0, 1, info.max], name)
    if name.startswith("complex"):
        return np.array([1 + 2j, -0.0 - 1j, complex(np.inf, np.nan)], name)
    dtype = "float32" if name == "bfloat16" else name
    info = np.finfo(dtype)  # signed zeros, NaN, infinities, a subnormal, the largest value
    return np.array(
        [0.0, -0.0, np.nan, np.inf, -np.inf, 1 / 3, info.tiny / 4, info.max, -7.5], dtype
    ).reshape(3, 3)


def _bits(be, x) -> tuple:
    a = be.to_numpy(x)
    return be.dtype_name(x.dtype), a.shape, np.ascontiguousarray(a).view(np.uint8).tobytes()


def _params(be, names):
    return {n: be.asarray(_value(n), dtype=n) for n in names}


@pytest.mark.parametrize("template", [False, True])
def test_every_dtype_round_trips_bitwise(be, tmp_path, template):
    names = [n for n in DTYPES if n != "complex128"]
    params = _params(be, names)
    save_checkpoint(tmp_path / "ck", params=params, opt_state={"m": params["bfloat16"]}, step=3)
    ck = load_checkpoint(
        tmp_path / "ck", backend=be, like_params=params if template else None, like_opt_state=None
    )
    for n in names:
        assert be.is_array(ck.params[n]), n
        assert _bits(be, ck.params[n]) == _bits(be, params[n]), n
    assert _bits(be, ck.opt_state["m"]) == _bits(be, params["bfloat16"])


def test_bfloat16_is_safetensors_bf16_and_numpy_gets_ml_dtypes(be, tmp_path):
    import ml_dtypes
    import safetensors

    x = be.asarray(_value("bfloat16"), dtype="bfloat16")
    save_checkpoint(tmp_path / "ck", params={"w": x}, step=1)
    name = json.loads((tmp_path / "ck" / MANIFEST).read_text())["tensors"]["file"]
    flat = dict(safetensors.deserialize((tmp_path / "ck" / name).read_bytes()))
    assert flat["params.w"]["dtype"] == "BF16"  # a plain safetensors bfloat16, for any reader
    w = load_checkpoint(tmp_path / "ck").params["w"]  # no backend: NumPy, ml_dtypes' bfloat16
    assert w.dtype == ml_dtypes.bfloat16 and w.tobytes() == be.to_numpy(x).tobytes()


@pytest.mark.parametrize("direction", ["torch->jax", "jax->torch"])
def test_bfloat16_and_float16_cross_backends_bitwise(both, tmp_path, direction):
    jx, th = both
    src, dst = (th, jx) if direction == "torch->jax" else (jx, th)
    params = _params(src, ["bfloat16", "float16"])
    save_checkpoint(tmp_path / "ck", params=params, step=2)
    like = _params(dst, ["bfloat16", "float16"])
    for kw in ({}, {"like_params": like}):
        ck = load_checkpoint(tmp_path / "ck", backend=dst.name, **kw)
        for n in params:
            assert dst.is_array(ck.params[n])
            assert _bits(dst, ck.params[n]) == _bits(src, params[n])


def test_complex128_is_refused_naming_the_leaf(tmp_path):
    with pytest.raises(TypeError, match=r"params\.layer\.z has dtype complex128, which a checkpoint cannot"):
        save_checkpoint(tmp_path / "ck", params={"layer": {"z": np.zeros(2, np.complex128)}}, step=1)
    with pytest.raises(TypeError, match=r"params\.s has dtype str32"):
        save_checkpoint(tmp_path / "ck", params={"s": np.array(["a"])}, step=1)
    assert not (tmp_path / "ck" / MANIFEST).exists()


# ----------------------------------------------------------------------------- damaged manifests


def _leaf(key, shape=(2,)):
    return {"key": key, "shape": list(shape), "dtype": "float64", "kind": "array"}


def _drop_leaf(m):  # one leaf fewer, structure and list agreeing: the tensor file still has it
    m["params"]["structure"] = {"type": "dict", "keys": ["a"], "children": ["*"]}
    m["params"]["leaves"] = m["params"]["leaves"][:1]


def _extra_leaf(m):  # one leaf more, structure and list agreeing: the tensor file lacks it
    m["params"]["structure"] = {"type": "dict", "keys": ["a", "b", "c"], "children": ["*", "*", "*"]}
    m["params"]["leaves"].append(_leaf("params.c"))


TAMPERS = {
    "not a dict": (lambda m: [1, 2], "is not a duogard checkpoint manifest"),
    "no step": (lambda m: m.pop("step"), "the manifest has no 'step'"),
    "step str": (lambda m: m.update(step="3"), "'step'] must be int, got str"),
    "step bool": (lambda m: m.update(step=True), "'step'] must be int, got bool"),
    "step negative": (lambda m: m.update(step=-1), "'step' must be a non-negative int64, got -1"),
    "step 1e30": (lambda m: m.update(step=10**30), "'step' must be a non-negative int64, got 1e+30"),
    "int kind on a float": (
        lambda m: m["params"]["leaves"][0].update(kind="int", shape=[]),
        "params leaf 'params.a' is a Python int but has dtype 'float64'",
    ),
    "key of floats": (
        lambda m: m.update(key={"shape": [2], "dtype": "float32", "backend": None}),
        "'key' must hold integers (raw key data), got dtype 'float32'",
    ),
    "no tensors": (lambda m: m.pop("tensors"), "the manifest has no 'tensors'"),
    "tensors null": (lambda m: m.update(tensors=None), "'tensors'] must be dict, got null"),
    "no sha": (lambda m: m["tensors"].pop("sha256"), "'tensors' has no 'sha256'"),
    "path escape": (lambda m: m["tensors"].update(file="../x.safetensors"), "bad tensor file name"),
    "bytes str": (lambda m: m["tensors"].update(bytes="9"), "'bytes'] must be int"),
    "version str": (lambda m: m.update(format_version="1"), "'format_version' must be an int"),
    "no params": (lambda m: m.pop("params"), "'params' is missing or null"),
    "params list": (lambda m: m.update(params=[]), "'params' must be an object, got list"),
    "leaves null": (lambda m: m["params"].update(leaves=None), "params['leaves'] must be list, got null"),
    "leaf not dict": (lambda m: m["params"]["leaves"].append(3), "params leaf 2 must be an object"),
    "leaf no key": (lambda m: m["params"]["leaves"][0].pop("key"), "params leaf 0 has no 'key'"),
    "bad shape": (lambda m: m["params"]["leaves"][0].update(shape=[-1]), "shape must be a list of non-neg"),
    "bad kind": (lambda m: m["params"]["leaves"][0].update(kind="blob"), "has kind 'blob'"),
    "dupe leaf": (lambda m: m["params"]["leaves"].__setitem__(1, _leaf("params.a")), "more than once"),
    "leaf fewer in list": (
        lambda m: m["params"]["leaves"].pop(),
        "structure holds 2 leaves but 1 are listed",
    ),
    "dict keys short": (lambda m: m["params"]["structure"]["keys"].pop(), "1 keys/fields for 2 children"),
    "renamed leaf": (
        lambda m: m["params"]["leaves"][1].update(key="params.x"),
        "params.x (structure: params.b)",
    ),
    "node type": (lambda m: m["params"]["structure"].update(type="set"), "unknown node type 'set'"),
    "node garbage": (
        lambda m: m["params"]["structure"]["children"].__setitem__(0, 7),
        "is int 7, not a tree",
    ),
    "opt_state str": (lambda m: m.update(opt_state="x"), "'opt_state' must be an object, got str"),
    "key list": (lambda m: m.update(key=[1]), "'key' must be an object or null"),
    "leaf fewer": (_drop_leaf, "in the tensor file but not listed in checkpoint.json: ['params.b']"),
    "extra leaf": (_extra_leaf, "listed in checkpoint.json but not in the tensor file: ['params.c']"),
    "wrong dtype": (
        lambda m: m["params"]["leaves"][0].update(dtype="float32"),
        "says float32[2], the tensor",
    ),
    "wrong shape": (
        lambda m: m["params"]["leaves"][0].update(shape=[1, 2]),
        "says float64[1, 2], the tensor",
    ),
    "no key tensor": (lambda m: m.update(key={"shape": [2], "dtype": "uint32", "backend": None}), "['key']"),
}


@pytest.mark.parametrize("name", list(TAMPERS))
def test_damaged_manifest_is_a_clear_error(tmp_path, name):
    tamper, message = TAMPERS[name]
    save_checkpoint(tmp_path / "ck", params={"a": np.zeros(2), "b": np.ones(2)}, step=3)
    path = tmp_path / "ck" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest = tamper(manifest) if name == "not a dict" else (tamper(manifest), manifest)[1]
    path.write_text(json.dumps(manifest))
    for like in (None, {"a": np.zeros(2), "b": np.ones(2)}):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(tmp_path / "ck", like_params=like)
        assert isinstance(info.value, ValueError) and str(path) in str(info.value)
        assert message in str(info.value), str(info.value)


@pytest.mark.parametrize("depth", [300, 100_000])
def test_a_deeply_nested_manifest_is_a_clear_error(tmp_path, depth):
    """Deeper than the checker's limit (200 levels), or than Python's recursion: no RecursionError."""
    save_checkpoint(tmp_path / "ck", params={"a": np.zeros(2)}, step=1)
    path = tmp_path / "ck" / MANIFEST
    text = path.read_text()
    nested = '{"type": "list", "children": [' * depth + '"*"' + "]}" * depth
    start = text.index('"structure"')
    end = text.index('"leaves"', start)
    path.write_text(text[:start] + f'"structure": {nested}, ' + text[end:])
    with pytest.raises(CheckpointError, match="nests (deeper than 200 levels|too deeply)") as info:
        load_checkpoint(tmp_path / "ck")
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "data", [np.arange(3, dtype=np.uint32), np.arange(2, dtype=np.int64)], ids=["shape", "dtype"]
)
def test_a_key_of_the_wrong_shape_or_dtype_does_not_load_as_a_key(be, tmp_path, data):
    save_checkpoint(tmp_path / "ck", params={"a": np.zeros(2)}, step=1, key=data)
    assert load_checkpoint(tmp_path / "ck").key.shape == data.shape  # raw data: as saved
    with pytest.raises(
        CheckpointError,
        match=rf"'key' holds {data.dtype.name}\[{data.size}\], but a {be.name} key is uint32\[2\]",
    ):
        load_checkpoint(tmp_path / "ck", backend=be.name)
    save_checkpoint(tmp_path / "ok", params={"a": np.zeros(2)}, step=1, key=be.key(3))
    assert np.array_equal(
        be.key_data(load_checkpoint(tmp_path / "ok", backend=be.name).key), be.key_data(be.key(3))
    )


def test_missing_tensor_file_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "ck", params={"a": np.zeros(2)}, step=1)
    name = json.loads((tmp_path / "ck" / MANIFEST).read_text())["tensors"]["file"]
    (tmp_path / "ck" / name).unlink()
    with pytest.raises(CheckpointError, match=f"names the tensor file {name}, which does not exist"):
        load_checkpoint(tmp_path / "ck")
