"""A shared checkpoint directory: one writer at a time, readers always whole; the fsync order."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from duogard.train import Checkpointer, CheckpointLockedError
from duogard.train import _checkpoint_io as ckio
from duogard.train.checkpoint import (
    MANIFEST,
    load_checkpoint,
    lock_directory,
    save_checkpoint,
    save_locked,
)


def _tree(v: float):
    return {"a": np.full(64, v, np.float32), "b": {"c": np.full((8, 2), v)}, "n": np.full(3, int(v))}


def _assert_whole(ck) -> None:
    """Every leaf of a loaded checkpoint holds its own step: nothing of another save mixed in."""
    s = ck.step
    leaves = [ck.params["a"], ck.params["b"]["c"], ck.params["n"]]
    assert all(np.all(leaf == s) for leaf in leaves), f"step {s}: mixed contents"
    assert all(np.all(leaf == -s) for leaf in (ck.opt_state[0]["a"], ck.opt_state[0]["n"]))
    assert ck.key.tolist() == [s, s]


def _save(path_or_lock, step: int) -> None:
    kw = dict(params=_tree(step), opt_state=(_tree(-step),), step=step, key=np.array([step, step], np.uint32))
    if isinstance(path_or_lock, Path):
        save_checkpoint(path_or_lock, **kw)
    else:
        save_locked(path_or_lock, **kw)


# ----------------------------------------------------------------------------- the writer lock


def test_a_second_writer_in_this_process_is_refused(tmp_path):
    ck = tmp_path / "ck"
    lock = lock_directory(ck)
    _save(lock, 1)
    with pytest.raises(CheckpointLockedError) as info:
        _save(ck, 2)
    msg = str(info.value)
    assert f"pid {os.getpid()} (this process) on host {socket.gethostname()}" in msg
    assert isinstance(info.value, RuntimeError) and info.value.holder["pid"] == os.getpid()
    with pytest.raises(CheckpointLockedError):
        lock_directory(ck)
    assert load_checkpoint(ck).step == 1  # nothing written by the refused save; readers need no lock
    lock.release()
    lock.release()  # idempotent
    _save(ck, 3)  # free again
    assert load_checkpoint(ck).step == 3 and (ck / ".duogard-lock").read_bytes() == b""


# ----------------------------------------------------------------------------- planted links


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path, dangling):
    """A link planted as .duogard-lock must not make the writer truncate or create its target."""
    from duogard.train.checkpoint import CheckpointError

    ck = tmp_path / "ck"
    ck.mkdir()
    victim = tmp_path / "victim.txt"
    if not dangling:
        victim.write_bytes(b"precious")
    (ck / ".duogard-lock").symlink_to(victim)
    for attempt in (lambda: lock_directory(ck), lambda: _save(ck, 1)):
        with pytest.raises(CheckpointError, match=r"\.duogard-lock is a symbolic link.*lock the directory"):
            attempt()
    if dangling:
        assert not victim.exists()  # no file created where the link points
    else:
        assert victim.read_bytes() == b"precious"
    assert not (ck / MANIFEST).exists()  # nothing written without the lock


def test_a_hard_linked_or_special_lock_file_is_refused(tmp_path):
    from duogard.train.checkpoint import CheckpointError

    ck = tmp_path / "ck"
    ck.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    os.link(victim, ck / ".duogard-lock")
    with pytest.raises(CheckpointError, match="2 hard links"):
        lock_directory(ck)
    assert victim.read_bytes() == b"precious"
    (ck / ".duogard-lock").unlink()
    os.mkfifo(ck / ".duogard-lock")
    with pytest.raises(CheckpointError, match="a special file"):  # and the open does not block
        lock_directory(ck)


def test_readers_do_not_follow_planted_links(tmp_path):
    """A manifest or tensor file replaced by a link (to /dev/zero, say: a read without end) is refused."""
    from duogard.train.checkpoint import CheckpointError

    ck = tmp_path / "ck"
    _save(ck, 1)
    tensors = next(p for p in ck.iterdir() if p.name.startswith("tensors-"))
    real = tmp_path / "real.safetensors"
    tensors.rename(real)
    tensors.symlink_to(real)
    with pytest.raises(CheckpointError, match="symbolic link.*read"):
        load_checkpoint(ck)
    tensors.unlink()
    real.rename(tensors)
    assert load_checkpoint(ck).step == 1
    (ck / MANIFEST).rename(tmp_path / MANIFEST)
    (ck / MANIFEST).symlink_to(tmp_path / MANIFEST)
    with pytest.raises(CheckpointError, match="symbolic link"):
        load_checkpoint(ck)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    import warnings

    lock = lock_directory(tmp_path / "ck")
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # JAX warns that forking a multithreaded process is unsafe
        pid = os.fork()
    if pid == 0:  # a data loader's worker: alive while the parent releases and retakes the lock
        os.write(write, b"1")  # (the fork hooks have run)
        time.sleep(5)
        os._exit(0)
    try:
        assert os.read(read, 1) == b"1"
        lock.release()
        again = lock_directory(tmp_path / "ck")  # not held by the child's copy of the descriptor
        again.release()
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(read)
        os.close(write)


def test_without_fcntl_saves_still_work_and_this_process_is_still_guarded(tmp_path, monkeypatch):
    from duogard.train import _checkpoint_lock

    monkeypatch.setattr(_checkpoint_lock, "fcntl", None)  # as on Windows
    ck = tmp_path / "ck"
    (ck / ".tmp-1-abcd-checkpoint.json").parent.mkdir()
    (ck / ".tmp-1-abcd-checkpoint.json").write_text("another writer's")
    lock = lock_directory(ck)
    assert not lock.exclusive
    _save(lock, 1)
    with pytest.raises(CheckpointLockedError, match="this process"):
        _save(ck, 2)
    lock.release()
    _save(ck, 3)
    _assert_whole(load_checkpoint(ck))
    assert (ck / ".tmp-1-abcd-checkpoint.json").exists()  # not ours to remove, unlocked


def _fake_run(step: int):
    return SimpleNamespace(
        params=_tree(step),
        opt_state=(_tree(-step),),
        key=np.array([step, step], np.uint32),
        be=SimpleNamespace(name="numpy"),
        result=SimpleNamespace(estimator="backprop", step=step),
        completed=True,
        start=0,
    )


def test_checkpointer_holds_the_lock_for_its_run(tmp_path):
    ck = tmp_path / "ck"
    first, second = Checkpointer(ck, every=1), Checkpointer(ck, every=1)
    first.on_fit_start(_fake_run(0))
    with pytest.raises(CheckpointLockedError, match=f"pid {os.getpid()}"):  # fails at start, not mid-run
        second.on_fit_start(_fake_run(0))
    second.on_fit_end(_fake_run(5))  # fit's finally: the refused one writes nothing, frees nothing
    assert not (ck / MANIFEST).exists()
    for step in (1, 2):
        first.on_step_end(_fake_run(step), {"step": step})
        with pytest.raises(CheckpointLockedError):  # held between saves too
            _save(ck, 99)
    first.on_fit_end(_fake_run(3))  # the last save, then the lock goes
    _assert_whole(load_checkpoint(ck))
    assert load_checkpoint(ck).step == 3
    second.on_fit_start(_fake_run(0))
    second.on_fit_end(_fake_run(4))
    assert load_checkpoint(ck).step == 4


# ----------------------------------------------------------------------------- readers


def test_a_reader_whose_tensor_file_went_away_reads_the_new_manifest(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    _save(ck, 1)
    read_manifest, calls = ckio.read_manifest, []

    def writer_between(directory):  # two saves land between reading the manifest and its file
        manifest = read_manifest(directory)
        calls.append(manifest["step"])
        if len(calls) == 1:
            _save(ck, 2)
            _save(ck, 3)  # removes step 1's tensor file
        return manifest

    monkeypatch.setattr(ckio, "read_manifest", writer_between)
    loaded = load_checkpoint(ck)
    assert calls == [1, 3] and loaded.step == 3
    _assert_whole(loaded)


_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from duogard.train.checkpoint import lock_directory, save_locked

    path, seconds = sys.argv[1], float(sys.argv[2])

    def tree(v):
        return {"a": np.full(64, v, np.float32), "b": {"c": np.full((8, 2), v)}, "n": np.full(3, int(v))}

    def save(lock, step):
        save_locked(lock, params=tree(step), opt_state=(tree(-step),), step=step,
                    key=np.array([step, step], np.uint32))

    lock = lock_directory(path)  # for the whole run, as a Checkpointer holds it
    save(lock, 1)
    print("ready", flush=True)
    end, step = time.monotonic() + seconds, 1
    while time.monotonic() < end:
        step += 1
        save(lock, step)
    lock.release()
    print(step, flush=True)
""")


@pytest.mark.integration  # starts a Python process
def test_two_writers_and_a_reader_share_a_directory(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ck), "2.5"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        # the second writer (this process) is refused, told who holds the directory
        with pytest.raises(CheckpointLockedError) as info:
            _save(ck, 10**6)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in str(info.value)
        assert info.value.holder["pid"] == proc.pid
        with pytest.raises(CheckpointLockedError, match=f"pid {proc.pid}"):
            Checkpointer(ck).on_fit_start(_fake_run(0))

        # the reader: every other load stalls after reading the manifest, long enough for
        # the writer to save twice and remove the tensor file that manifest names
        read_manifest, stall = ckio.read_manifest, {"now": False, "reads": 0}

        def slow(directory):
            manifest = read_manifest(directory)
            stall["reads"] += 1
            if stall["now"]:
                stall["now"] = False
                time.sleep(0.03)
            return manifest

        monkeypatch.setattr(ckio, "read_manifest", slow)
        steps = []
        while proc.poll() is None:
            stall["now"] = len(steps) % 2 == 1
            loaded = load_checkpoint(ck)  # never fails
            _assert_whole(loaded)
            steps.append(loaded.step)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:  # pragma: no cover - a failed assertion above
            proc.kill()
            proc.wait()
    last = int(proc.stdout.readline())
    assert steps == sorted(steps) and len(steps) > 10 and last > 5, (len(steps), last)
    assert load_checkpoint(ck).step == last
    _save(ck, last + 1)  # the writer is gone: the directory is free


# ----------------------------------------------------------------------------- the fsync order


def _record_save(tmp_path, monkeypatch) -> list[tuple]:
    """The third save into a directory, as (operation, file kind, ...) events."""
    ck = tmp_path / "ck"
    _save(ck, 1)
    _save(ck, 2)
    events, names = [], {}
    real = {n: getattr(os, n) for n in ("open", "write", "fsync", "replace", "close")}

    def kind(path) -> str:
        p = Path(path)
        if p == ck:
            return "dir"
        temp = "tmp-" if p.name.startswith(".tmp-") else ""
        return temp + (
            "manifest" if p.name.endswith(MANIFEST) else "tensors" if "tensors-" in p.name else p.name
        )

    def spy_open(path, flags, *args, **kw):
        fd = real["open"](path, flags, *args, **kw)
        names[fd] = kind(path)
        return fd

    def spy(op):
        def wrapped(fd, *args):
            events.append((op, names.get(fd, "?")))
            return real[op](fd, *args)

        return wrapped

    def spy_replace(src, dst):
        events.append(("replace", kind(src), kind(dst)))
        return real["replace"](src, dst)

    real_unlink = Path.unlink

    def spy_unlink(self, *args, **kw):
        events.append(("unlink", kind(self)))
        return real_unlink(self, *args, **kw)

    monkeypatch.setattr(Path, "unlink", spy_unlink)
    monkeypatch.setattr(os, "open", spy_open)
    for op in ("write", "fsync", "close"):
        monkeypatch.setattr(os, op, spy(op))
    monkeypatch.setattr(os, "replace", spy_replace)
    _save(ck, 3)
    monkeypatch.undo()
    return [e for e in events if e[1] != ".duogard-lock"]


def _order_problems(events: list[tuple]) -> list[str]:
    """What is out of order in a save's events (empty: a crash-safe save)."""
    problems = []
    at = {e: i for i, e in reversed(list(enumerate(events)))}  # first occurrence
    last = {e: i for i, e in enumerate(events)}
    rename_t, rename_m = (
        at.get(("replace", "tmp-tensors", "tensors")),
        at.get(("replace", "tmp-manifest", "manifest")),
    )
    if rename_t is None or rename_m is None:
        return ["a rename is missing"]
    for tmp, rename in (("tmp-tensors", rename_t), ("tmp-manifest", rename_m)):
        sync = last.get(("fsync", tmp), -1)
        if not last.get(("write", tmp), -1) < sync < rename:
            problems.append(f"{tmp} is not fsynced after its last write and before its rename")
    if not rename_t < at.get(("write", "tmp-manifest"), -1):
        problems.append("the manifest is written before the tensor file has its name")
    dir_syncs = [i for i, e in enumerate(events) if e == ("fsync", "dir")]
    if not any(rename_t < i < rename_m for i in dir_syncs):
        problems.append("no directory fsync between the tensor file's rename and the manifest's")
    removals = [i for i, e in enumerate(events) if e[0] == "unlink"] or [len(events)]
    if not any(rename_m < i < min(removals) for i in dir_syncs):
        problems.append("no directory fsync after the manifest's rename (before removing old files)")
    return problems


def _write_without_fsync(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.write(fd, data)
    os.close(fd)


def test_save_order_is_write_fsync_rename_manifest_last(tmp_path, monkeypatch):
    events = _record_save(tmp_path, monkeypatch)
    assert _order_problems(events) == [], events
    assert ("unlink", "tensors") in events  # step 1's tensor file, after the commit
    # the check sees each fsync: without any one of them, the save is out of order
    fsyncs = [i for i, e in enumerate(events) if e[0] == "fsync"]
    assert len(fsyncs) == 4
    for i in fsyncs:
        assert _order_problems(events[:i] + events[i + 1 :]), events[i]


@pytest.mark.parametrize("mutant", ["write_file", "fsync_dir"])
def test_a_writer_without_its_fsyncs_fails_the_order_check(tmp_path, monkeypatch, mutant):
    replacement = _write_without_fsync if mutant == "write_file" else lambda directory: None
    monkeypatch.setattr(ckio, mutant, replacement)
    assert _order_problems(_record_save(tmp_path, monkeypatch)) != []
