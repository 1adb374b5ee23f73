"""Checkpoints: bitwise round trips, cross-backend loads, templates, no pickle, crash safety."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from duogard.train.checkpoint import (
    MANIFEST,
    Checkpoint,
    CheckpointMismatchError,
    is_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

from helpers import to_backend, to_numpy


class MomentumState(NamedTuple):
    count: np.ndarray
    trace: dict


def _special_floats(dtype):
    info = np.finfo(dtype)
    return np.array([0.0, -0.0, np.nan, np.inf, -np.inf, info.tiny / 4, info.max, 1 / 3], dtype)


def _params(rng):
    return {
        "0": {"weight": rng.standard_normal((4, 3)).astype(np.float32), "bias": _special_floats(np.float32)},
        "2": {"weight": rng.standard_normal((2, 4)), "bias": _special_floats(np.float64)},
    }


def _opt_state(params):
    zeros = {k: {n: np.full_like(a, 0.5) for n, a in v.items()} for k, v in params.items()}
    return (MomentumState(np.array(7, np.int32), zeros), None, {"lr": 0.05, "steps": 3, "on": True})


def _bits(a):
    a = np.asarray(a)
    return a.dtype, a.shape, a.tobytes()


def _assert_bitwise(a, b):
    import optree

    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if isinstance(x, (bool, int, float)):
            assert type(x) is type(y) and x == y
        else:
            assert _bits(x) == _bits(y)


# ----------------------------------------------------------------------------- round trips


def test_round_trip_is_bitwise(tmp_path, rng):
    params, ints = (
        _params(rng),
        {
            "i64": np.arange(-3, 3, dtype=np.int64),
            "u8": np.arange(250, 256, dtype=np.uint8),
            "flag": np.array([True, False]),
            "scalar": np.array(2.5),
            "empty": np.zeros((0, 3), np.float32),
        },
    )
    opt = _opt_state(params)
    out = save_checkpoint(
        tmp_path / "ck",
        params={**params, "x": ints},
        opt_state=opt,
        step=12,
        key=np.array([0, 42], np.uint32),
        config={"lr": 0.05, "layers": [64, 10]},
        metrics={"loss": np.float32(0.25), "acc": 0.5},
    )
    assert out == tmp_path / "ck" and is_checkpoint(out)
    ck = load_checkpoint(tmp_path / "ck")  # no templates: rebuilt from the manifest
    assert isinstance(ck, Checkpoint) and ck.step == 12
    _assert_bitwise(ck.params, {**params, "x": ints})
    _assert_bitwise(ck.opt_state, opt)
    assert ck.opt_state[0].trace["0"]["bias"].dtype == np.float32  # namedtuple fields by name
    assert type(ck.opt_state[0]).__name__ == "MomentumState" and ck.opt_state[1] is None
    assert ck.opt_state[2] == {"lr": 0.05, "steps": 3, "on": True}
    assert ck.key.tolist() == [0, 42] and ck.config == {"lr": 0.05, "layers": [64, 10]}
    assert ck.metrics == {"loss": 0.25, "acc": 0.5}
    assert ck.info["backend"] == "numpy" and ck.info["duogard_version"]

    # with templates: the template's own types come back (MomentumState itself)
    ck = load_checkpoint(tmp_path / "ck", like_params={**params, "x": ints}, like_opt_state=opt)
    assert type(ck.opt_state[0]) is MomentumState
    _assert_bitwise(ck.opt_state, opt)


def test_files_and_manifest(tmp_path, rng):
    params = _params(rng)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path / "ck", params=params, step=step)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    # the lock, the manifest, the tensor file of step 3 and (for readers) of step 2, not of 1
    assert names[:2] == [".duogard-lock", MANIFEST] and len(names) == 4
    assert names[2].startswith("tensors-00000002-") and names[3].startswith("tensors-00000003-")
    assert names[3].endswith(".safetensors") and (tmp_path / "ck" / ".duogard-lock").read_bytes() == b""
    manifest = json.loads((tmp_path / "ck" / MANIFEST).read_text())
    assert manifest["step"] == 3 and manifest["tensors"]["file"] == names[3]
    assert [m["key"] for m in manifest["params"]["leaves"]] == [
        "params.0.bias",
        "params.0.weight",
        "params.2.bias",
        "params.2.weight",
    ]
    import safetensors.numpy

    flat = safetensors.numpy.load_file(str(tmp_path / "ck" / names[3]))  # a plain safetensors file
    assert set(flat) == {"params.0.bias", "params.0.weight", "params.2.bias", "params.2.weight"}
    assert load_checkpoint(tmp_path / "ck" / MANIFEST).step == 3  # the manifest path works too


def test_optax_adam_state_round_trip_with_template(tmp_path, rng):
    optax = pytest.importorskip("optax")
    import jax

    be = pytest.importorskip("duogard_jax")
    params = to_backend(
        be, {"0": {"weight": rng.standard_normal((3, 2)).astype(np.float32), "bias": np.zeros(3, np.float32)}}
    )
    opt = optax.chain(optax.clip(1.0), optax.adam(1e-2))
    state = opt.init(params)
    grads = jax.tree_util.tree_map(lambda p: p * 0.3 + 1, params)
    for _ in range(3):
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    save_checkpoint(tmp_path / "ck", params=params, opt_state=state, step=3, key=be.key(9))
    template = opt.init(params)
    ck = load_checkpoint(tmp_path / "ck", like_params=params, like_opt_state=template, backend="jax")
    assert jax.tree_util.tree_structure(ck.opt_state) == jax.tree_util.tree_structure(state)
    _assert_bitwise(to_numpy(be, ck.opt_state), to_numpy(be, state))
    # and the optimizer carries on from it exactly
    a = opt.update(grads, state, params)[0]
    b = opt.update(grads, ck.opt_state, ck.params)[0]
    _assert_bitwise(to_numpy(be, a), to_numpy(be, b))
    assert ck.info["backend"] == "jax"


def test_key_round_trip(be, tmp_path):
    key = be.split(be.key(5))[1]
    save_checkpoint(tmp_path / "ck", params={"w": np.ones(2)}, step=0, key=key)
    ck = load_checkpoint(tmp_path / "ck", backend=be)
    np.testing.assert_array_equal(be.key_data(ck.key), be.key_data(key))
    draw = lambda k: be.to_numpy(be.normal(k, (4,), dtype=be.float64))  # noqa: E731
    np.testing.assert_array_equal(draw(ck.key), draw(key))  # same random stream on resume


@pytest.mark.parametrize("direction", ["torch->jax", "jax->torch"])
def test_cross_backend(both, tmp_path, rng, direction):
    jx, th = both
    src, dst = (th, jx) if direction == "torch->jax" else (jx, th)
    params = _params(rng)
    opt = _opt_state(params)
    src_opt = (
        opt[0]._replace(count=src.asarray(np.array(7, np.int32)), trace=to_backend(src, opt[0].trace)),
        None,
        opt[2],
    )
    save_checkpoint(
        tmp_path / "ck", params=to_backend(src, params), opt_state=src_opt, step=4, key=src.key(1)
    )
    template = (
        opt[0]._replace(count=dst.asarray(np.array(0, np.int64)), trace=to_backend(dst, opt[0].trace)),
        None,
        opt[2],
    )
    ck = load_checkpoint(
        tmp_path / "ck", like_params=to_backend(dst, params), like_opt_state=template, backend=dst.name
    )
    assert ck.info["backend"] == src.name
    assert all(dst.is_array(leaf) for leaf in dst.tree_leaves(ck.params))
    _assert_bitwise(to_numpy(dst, ck.params), params)
    _assert_bitwise(to_numpy(dst, ck.opt_state[0].trace), opt[0].trace)
    count = ck.opt_state[0].count  # int32 written, int64 template: cast, value kept
    assert dst.dtype_name(count.dtype) == "int64" and int(dst.to_numpy(count)) == 7
    np.testing.assert_array_equal(dst.key_data(ck.key), src.key_data(src.key(1)))


# ----------------------------------------------------------------------------- mismatches


def test_mismatch_lists_every_difference(tmp_path, rng):
    params = _params(rng)
    save_checkpoint(tmp_path / "ck", params=params, opt_state=_opt_state(params), step=1)
    like = {
        "0": {"weight": np.zeros((4, 5), np.float32), "bias": params["0"]["bias"]},
        "2": {"weight": params["2"]["weight"].astype(np.float32)},
        "3": {"weight": np.zeros(2), "bias": np.zeros(2)},
    }
    like_opt = (MomentumState(np.array(0), {}), None, {"lr": 0.1, "steps": 0, "on": False})
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(tmp_path / "ck", like_params=like, like_opt_state=like_opt)
    msg = str(info.value)
    assert "params: missing keys (2):\n    params.3.bias\n    params.3.weight" in msg
    assert "params: extra keys (1):\n    params.2.bias" in msg
    assert "params.0.weight: checkpoint (4, 3), expected (4, 5)" in msg
    assert "params.2.weight: checkpoint float64, expected float32" in msg
    assert "opt_state: extra keys (4)" in msg and "opt_state.0.trace.0.weight" in msg
    assert isinstance(info.value, ValueError)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="step must be a non-negative int, got -1"):
        save_checkpoint(tmp_path / "a", params={"w": np.ones(1)}, step=-1)
    with pytest.raises(TypeError, match="step must be an int, got float"):
        save_checkpoint(tmp_path / "a", params={"w": np.ones(1)}, step=1.5)
    with pytest.raises(TypeError, match="config must be JSON-serialisable.*object"):
        save_checkpoint(tmp_path / "a", params={"w": np.ones(1)}, step=1, config={"f": object()})
    with pytest.raises(TypeError, match="params.w must be an array"):
        save_checkpoint(tmp_path / "a", params={"w": "text"}, step=1)
    with pytest.raises(ValueError, match="collide"):
        save_checkpoint(tmp_path / "a", params={"a.b": np.ones(1), "a": {"b": np.ones(1)}}, step=1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is not a directory"):
        save_checkpoint(tmp_path / "file", params={"w": np.ones(1)}, step=1)
    assert not (tmp_path / "a").exists() or not is_checkpoint(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing")


def test_dataclass_config_and_framework_scalars(be, tmp_path):
    @dataclasses.dataclass
    class Config:
        lr: float = 0.1
        sizes: tuple = (3, 4)

    save_checkpoint(
        tmp_path / "ck",
        params={"w": be.asarray(np.ones(2, np.float32))},
        step=2,
        config=Config(),
        metrics={"loss": be.asarray(np.float32(0.5))},
    )
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.config == {"lr": 0.1, "sizes": [3, 4]} and ck.metrics == {"loss": 0.5}


def test_corrupt_tensor_file_is_detected(tmp_path):
    save_checkpoint(tmp_path / "ck", params={"w": np.arange(100.0)}, step=1)
    tensors = next((tmp_path / "ck").glob("tensors-*.safetensors"))
    raw = bytearray(tensors.read_bytes())
    raw[-1] ^= 1
    tensors.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match the size/SHA-256"):
        load_checkpoint(tmp_path / "ck")


# ----------------------------------------------------------------------------- never unpickle


class _Payload:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (Path(self.sentinel),))


def test_pickles_are_refused_never_executed(tmp_path):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(proof)))
    assert proof.exists()  # the payload really runs code when unpickled

    sentinel = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(sentinel))
    (tmp_path / "model.ckpt").write_bytes(payload)  # a pickle named like a checkpoint
    with pytest.raises(ValueError, match="never unpickles"):
        load_checkpoint(tmp_path / "model.ckpt")

    (tmp_path / "d1").mkdir()  # a pickle in place of the manifest
    (tmp_path / "d1" / MANIFEST).write_bytes(payload)
    with pytest.raises(ValueError, match="is not JSON"):
        load_checkpoint(tmp_path / "d1")

    save_checkpoint(tmp_path / "d2", params={"w": np.ones(2)}, step=1)  # a pickle as tensor file
    manifest = json.loads((tmp_path / "d2" / MANIFEST).read_text())
    (tmp_path / "d2" / manifest["tensors"]["file"]).write_bytes(payload)
    import hashlib

    manifest["tensors"].update(bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    (tmp_path / "d2" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_checkpoint(tmp_path / "d2")
    assert not sentinel.exists()


# ----------------------------------------------------------------------------- crash safety

_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import numpy as np
    from duogard.train import _checkpoint_io, checkpoint as ck

    path, kill_at, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    _checkpoint_io._CHUNK = 1 << 20  # smaller write chunks: more points to crash at, with small files

    def tree(v):
        return {"a": np.full(size, v, np.float32), "b": {"c": np.full((size // 2, 2), v)}}

    if kill_at < 0:  # loop forever, alternating contents; the parent kills us at a random time
        ck.save_checkpoint(path, params=tree(1.0), step=1)
        print("ready", flush=True)
        i = 1
        while True:
            i += 1
            ck.save_checkpoint(path, params=tree(float(i)), opt_state=(tree(-float(i)),), step=i)

    ck.save_checkpoint(path, params=tree(1.0), step=1)
    ck.save_checkpoint(path, params=tree(1.0), step=1)  # the next save removes the first's file
    events = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            events.append(name)
            if len(events) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return wrapped

    os.write, os.fsync = spy("write", os.write), spy("fsync", os.fsync)
    os.replace = spy("replace", os.replace)
    Path.unlink = spy("unlink", Path.unlink)
    ck.save_checkpoint(path, params=tree(2.0), opt_state=(tree(-2.0),), step=2)
    print(",".join(events))
    print([m for m in ("jax", "torch") if m in sys.modules])  # NumPy checkpoints need no framework
""")


def _run_writer(tmp_path, kill_at, size):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ck"), str(kill_at), str(size)],
        capture_output=True,
        text=True,
        env=env,
    )


def _assert_whole(path) -> int:
    ck = load_checkpoint(path)
    step = ck.step
    leaves = [ck.params["a"], ck.params["b"]["c"]]
    assert all(np.all(leaf == step) for leaf in leaves), f"step {step}: mixed contents"
    if step == 1:
        assert ck.opt_state is None
    else:
        assert np.all(ck.opt_state[0]["a"] == -step)
    return step


@pytest.mark.integration  # starts a Python process
def test_kill_at_every_point_of_a_save(tmp_path):
    size = 150_000  # 0.6 MB of float32 + 1.2 MB of float64 per tree: several 1 MB chunks
    full = _run_writer(tmp_path, 0, size)
    assert full.returncode == 0, full.stderr
    events_line, frameworks = full.stdout.strip().splitlines()
    assert frameworks == "[]"
    events = events_line.split(",")
    commit = [i for i, e in enumerate(events) if e == "replace"][1] + 1  # 1-based: manifest rename
    assert events.count("write") >= 4 and "unlink" in events
    for kill_at in range(1, len(events) + 1):
        out = _run_writer(tmp_path, kill_at, size)
        assert out.returncode == -signal.SIGKILL, (kill_at, out.stderr)
        step = _assert_whole(tmp_path / "ck")
        assert step == (1 if kill_at <= commit else 2), (kill_at, events[kill_at - 1])
        # and the next save after the crash works and cleans up
        if kill_at == commit - 1:
            save_checkpoint(tmp_path / "ck", params={"a": np.zeros(1)}, step=9)
            names = sorted(p.name.split("-")[0] for p in (tmp_path / "ck").iterdir())
            assert names == [".duogard", MANIFEST, "tensors", "tensors"]  # no temporaries left


@pytest.mark.integration  # starts a Python process
def test_sigkill_at_random_times(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    rng = np.random.default_rng(0)
    steps = []
    for delay in rng.uniform(0.0, 0.4, size=6):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "ck"), "-1", "400000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        steps.append(_assert_whole(tmp_path / "ck"))
    assert max(steps) > 1  # the kills did land during later saves
