"""Data-parallel training (``fit(distributed=...)``): 2-rank runs on loopback, both backends.

Process start-up (torch and JAX imports) dominates, so each backend gets ONE ``torchrun`` launch
whose worker (``_WORKER`` below) runs every check and writes its findings to a JSON file per rank;
the launches run concurrently, and the tests read the files. The worker compares each 2-rank run
with the single-process run of the same seed (rank 0 runs those): float64 within 1e-10 relative,
float32 within 1e-5, for backprop and forward gradients; ranks' parameter hashes at every
checkpoint; rank-0-only logs; resuming across the two kinds of run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import AVAILABLE, child_pythonpath, free_port, one_rank_env

TORCHRUN = Path(sys.executable).with_name("torchrun")

pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="needs torchrun (torch) as the launcher")

_WORKER = textwrap.dedent(
    """
    import dataclasses, hashlib, json, os, sys, tempfile
    import numpy as np
    import duogard as dg
    from duogard.train import Checkpointer, DataParallel, LogFile, load_checkpoint

    name, out = sys.argv[1], sys.argv[2]
    be = dg.backend(name)
    if name == "jax":
        import jax
        jax.config.update("jax_disable_most_optimizations", True)  # tiny programs: compile fast
    else:
        import torch
        torch.set_num_threads(1)
    be.enable_float64()
    rank = int(os.environ["RANK"])
    base = dg.data.load("digits")
    model = dg.train.build_model("mlp", 10, hidden=(16,))
    p32 = model.init(0, base.example_input)
    data = {"float32": base, "float64": dataclasses.replace(
        base, x_train=base.x_train.astype(np.float64), x_test=base.x_test.astype(np.float64))}
    params = {"float32": p32, "float64": dg.tree.tree_map(lambda a: a.astype(np.float64), p32)}
    tmp = __import__("pathlib").Path(out)

    def digest(tree):
        h = hashlib.sha256()
        for leaf in dg.tree.tree_leaves(tree):
            h.update(np.ascontiguousarray(be.to_numpy(leaf)).tobytes())
        return h.hexdigest()

    def rel(a, b):
        a, b = dg.tree.tree_leaves(a), dg.tree.tree_leaves(b)
        return max(float(np.max(np.abs(be.to_numpy(x) - be.to_numpy(y))) / np.max(np.abs(be.to_numpy(y))))
                   for x, y in zip(a, b))

    trainers = {}

    def run(dtype, est, steps, **kw):  # one Trainer per method: its steps compile once
        tr = trainers.setdefault((dtype, str(est)), dg.train.Trainer(model, estimator=est, backend=name))
        return dg.fit(model, params[dtype], data[dtype], trainer=tr, steps=steps, batch_size=32, seed=3, **kw)

    found = {}
    forward3, forward2 = dg.estimator("forward", num_tangents=3), dg.estimator("forward", num_tangents=2)
    configs = {
        "backprop64": ("float64", "backprop", "shared"),
        "forward64": ("float64", forward3, "shared"),
        "backprop32": ("float32", "backprop", "shared"),
        "forward32": ("float32", "forward", "shared"),  # K = 1: the factored update
        "per_rank64": ("float64", forward2, "per_rank"),
    }
    if name == "jax":  # its forward steps take seconds to compile: float32 is checked on forward
        del configs["backprop32"]
    for key, (dtype, est, mode) in configs.items():
        dp = DataParallel(tangents=mode, timeout=60)
        cbs = [Checkpointer(tmp / f"ck-{key}", every=2), LogFile(tmp / f"log-{key}-{rank}.jsonl")]
        r = run(dtype, est, 4, callbacks=cbs, distributed=dp)
        entry = {"losses": [h["loss"] for h in r.history], "hash": digest(r.params),
                 "ckpt_hashes": dp.hashes, "numbers": dp.numbers_per_step, "exchange": dp.exchange,
                 "strategy": r.update_strategy, "size": dg.tree.tree_size(r.params)}
        if rank == 0 and mode == "shared":
            ref = run(dtype, est, 4, callbacks=[])
            entry["rel"] = rel(r.params, ref.params)
            pairs = zip(entry["losses"], ref.history)
            entry["loss_rel"] = max(abs(a - b["loss"]) / abs(b["loss"]) for a, b in pairs)
            ck = load_checkpoint(tmp / f"ck-{key}", backend=name)
            entry["ckpt_is_params"] = digest(ck.params) == entry["hash"] and int(ck.step) == 4
            if key == "forward64":  # a data-parallel checkpoint resumes single-process
                longer = run(dtype, est, 6, callbacks=[])
                cont = run(dtype, est, 6, callbacks=[Checkpointer(resume=tmp / f"ck-{key}")])
                entry["resumed_single_rel"] = rel(cont.params, longer.params)
                entry["resumed_single_steps"] = [h["step"] for h in cont.history]
                found["ref_forward64"] = digest(ref.params)
                leaves = dg.tree.tree_leaves(ref.params)
                found["ref_forward64_params"] = [be.to_numpy(a).tolist() for a in leaves]
        found[key] = entry

    # a single-process checkpoint resumes data-parallel (each rank wrote the same one)
    dtype, est, _ = configs["forward64"]
    run(dtype, est, 2, callbacks=[Checkpointer(tmp / f"single-{rank}")])
    r = run(dtype, est, 4, callbacks=[Checkpointer(resume=tmp / f"single-{rank}")], distributed=True)
    found["single_to_dp"] = {"hash": digest(r.params), "steps": [h["step"] for h in r.history],
                             "params": [be.to_numpy(a).tolist() for a in dg.tree.tree_leaves(r.params)]}
    if name == "torch":  # the main job under torchrun: every run data-parallel, equal to one process
        from duogard.comparison import compare_methods
        kw = dict(backends=["torch"], methods=["backprop", "forward:num_tangents=2"], steps=4,
                  batch_size=32, seed=3, out_dir=None, log=None, progress=False, diagnostics_every=0)
        got = compare_methods(model, base, distributed=True, **kw)
        found["compare"] = {"world": got["config"]["world_size"],
                            "losses": [[h["loss"] for h in r["history"]] for r in got["runs"]]}
        if rank == 0:
            single = compare_methods(model, base, **kw)
            found["compare"]["single"] = [[h["loss"] for h in r["history"]] for r in single["runs"]]
    with open(tmp / f"out-{rank}.json", "w") as f:
        json.dump(found, f)
    """
)

# torchrun --max-restarts 1, 3 ranks: rank 1 dies after step 3 on the first attempt; ranks 0 and
# 2 must stop with an error naming it; the restarted group resumes from the checkpoint and must
# end with the params of an uninterrupted run
_FAULT_WORKER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import numpy as np
    import duogard as dg
    from duogard.train import Checkpointer, DataParallel, LambdaCallback
    import torch
    torch.set_num_threads(1)
    out = sys.argv[1]
    rank, restart = int(os.environ["RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    data = dg.data.load("digits")
    model = dg.train.build_model("mlp", 10, hidden=(16,))
    params = model.init(0, data.example_input)
    trainer = dg.train.Trainer(model, estimator="forward", backend="torch")

    def digest(tree):
        return hashlib.sha256(b"".join(np.ascontiguousarray(a.numpy()).tobytes()
                                       for a in dg.tree.tree_leaves(tree))).hexdigest()

    def die(record):
        if rank == 1 and restart == 0 and record["step"] == 3:
            os._exit(3)

    def run(where, cbs):
        return dg.fit(model, params, data, trainer=trainer, steps=6, batch_size=30, seed=1,
                      callbacks=[Checkpointer(where, every=2), *cbs], distributed=DataParallel(timeout=30))

    r = run(f"{out}/ck", [LambdaCallback(die)])
    ref = run(f"{out}/ref", [])
    if rank == 0:
        # and 3 ranks follow the single-process trajectory too (float32)
        single = dg.fit(model, params, data, trainer=trainer, steps=6, batch_size=30, seed=1, callbacks=[])
        rel = max(float(np.max(np.abs(a.numpy() - b.numpy())) / np.max(np.abs(b.numpy())))
                  for a, b in zip(dg.tree.tree_leaves(ref.params), dg.tree.tree_leaves(single.params)))
        losses = [(a["loss"], b["loss"]) for a, b in zip(ref.history, single.history)]
        with open(f"{out}/restart.json", "w") as f:
            json.dump({"restart": restart, "steps": [h["step"] for h in r.history],
                       "same": digest(r.params) == digest(ref.params), "single_rel": rel,
                       "loss_rel": max(abs(a - b) / abs(b) for a, b in losses)}, f)
    """
)


def _launch(script: Path, args: list[str], *, extra: tuple = (), nproc: int = 2) -> subprocess.Popen:
    cmd = [str(TORCHRUN), "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), *extra, str(script), *args]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=child_pythonpath(), OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the 2-rank launch did not finish in {timeout} s:\n{out[-4000:]}")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each backend's worker output per rank: ``{backend: [rank 0's, rank 1's]}``."""
    root = tmp_path_factory.mktemp("dist")
    script = root / "worker.py"
    script.write_text(_WORKER)
    procs = {}
    for name in AVAILABLE:
        (root / name).mkdir()
        procs[name] = _launch(script, [name, str(root / name)])
    fault = root / "fault.py"
    fault.write_text(_FAULT_WORKER)
    (root / "restart").mkdir()
    # 3 ranks, so the survivors must find out which of the two others died (a roll call in the
    # agent's store); the agent looks at its workers every 10 s, so they live to say it
    procs["restart"] = _launch(
        fault, [str(root / "restart")], extra=("--max-restarts", "1", "--monitor-interval", "10"), nproc=3
    )
    found = {}
    for name, proc in list(procs.items()):
        if name == "restart":
            out = _finish(proc)
            found[name] = (out, root / name / "restart.json")
            continue
        out = _finish(proc)
        if proc.returncode and "address already in use" in out.lower():  # a port taken meanwhile
            out = _finish(_launch(script, [name, str(root / name)]))
        files = [root / name / f"out-{r}.json" for r in range(2)]
        assert all(f.exists() for f in files), out[-6000:]
        found[name] = [json.loads(f.read_text()) for f in files] + [root / name]
    return found


TOL = {"64": 1e-10, "32": 1e-5}
CONFIGS = ("backprop64", "forward64", "forward32")  # and "backprop32" on torch


@pytest.mark.parametrize("backend", AVAILABLE)
def test_two_ranks_follow_the_single_process_trajectory(runs, backend):
    r0, r1, _ = runs[backend]
    for key in CONFIGS:
        tol = TOL[key[-2:]]
        assert r0[key]["rel"] <= tol, (key, r0[key]["rel"])
        assert r0[key]["loss_rel"] <= tol, (key, r0[key]["loss_rel"])
        assert r0[key]["losses"] == r1[key]["losses"]  # the reduced loss: the same on every rank


@pytest.mark.parametrize("backend", AVAILABLE)
def test_parameters_stay_bitwise_identical_across_ranks(runs, backend):
    r0, r1, _ = runs[backend]
    for key in (*CONFIGS, "per_rank64", "single_to_dp"):
        assert r0[key]["hash"] == r1[key]["hash"], key
    for key in (*CONFIGS, "per_rank64"):
        assert [s for s, _ in r0[key]["ckpt_hashes"]] == [2, 4]  # each checkpoint (the end is step 4)
        assert r0[key]["ckpt_hashes"] == r1[key]["ckpt_hashes"]


@pytest.mark.parametrize("backend", AVAILABLE)
def test_what_goes_on_the_wire(runs, backend):
    r0, _, _ = runs[backend]
    assert r0["forward64"]["exchange"] == "directional" and r0["forward64"]["numbers"] == 3 + 1
    assert r0["forward32"]["numbers"] == 2 and r0["forward32"]["strategy"] == "sgd-factored"
    assert r0["backprop64"]["exchange"] == "gradient"
    assert r0["backprop64"]["numbers"] == r0["backprop64"]["size"] + 1
    assert r0["per_rank64"]["exchange"] == "gathered" and r0["per_rank64"]["numbers"] == 2 * (2 + 1)
    # per-rank tangents: another estimate (2·K tangents), still the same on both ranks
    assert r0["per_rank64"]["hash"] != r0["forward64"]["hash"]


@pytest.mark.parametrize("backend", AVAILABLE)
def test_rank_zero_alone_logs_and_writes(runs, backend):
    _, _, where = runs[backend]
    for key in CONFIGS:
        assert (where / f"log-{key}-0.jsonl").exists()
        assert not (where / f"log-{key}-1.jsonl").exists()
        assert (where / f"ck-{key}" / "checkpoint.json").exists()


@pytest.mark.parametrize("backend", AVAILABLE)
def test_checkpoints_cross_between_distributed_and_single_process(runs, backend):
    import numpy as np

    r0, _, _ = runs[backend]
    f = r0["forward64"]
    assert f["ckpt_is_params"]  # the checkpoint holds exactly the ranks' params
    assert f["resumed_single_steps"] == [5, 6] and f["resumed_single_rel"] <= 1e-10
    s = r0["single_to_dp"]
    assert s["steps"] == [3, 4]
    for a, b in zip(s["params"], r0["ref_forward64_params"]):
        a, b = np.asarray(a), np.asarray(b)
        assert np.max(np.abs(a - b)) <= 1e-10 * np.max(np.abs(b))


def test_a_dead_rank_stops_the_others_and_torchrun_restarts_resume(runs):
    out, result = runs["restart"]
    # the survivors' errors name the rank that died, not "one of ranks [1, 2]" (a roll call)
    # (unless torchrun's agent stopped them first: then there is nothing to print)
    if "closing signal SIGTERM" not in out:
        assert "rank 0 of 3: the collective of step 4 failed: rank 1 stopped" in out, out[-4000:]
        assert "rank 2 of 3: the collective of step 4 failed: rank 1 stopped" in out, out[-4000:]
    assert result.exists(), out[-4000:]
    got = json.loads(result.read_text())
    assert got["restart"] == 1  # the group was restarted once ...
    assert got["steps"][0] > 1 and got["steps"][-1] == 6  # ... resumed from a checkpoint ...
    assert got["same"]  # ... and ended with the uninterrupted run's params, bitwise
    # the uninterrupted 3-rank run is the single-process run (float32)
    assert got["single_rel"] <= 1e-5 and got["loss_rel"] <= 1e-5, got


def test_compare_runs_every_method_data_parallel(runs):
    """``compare_methods(distributed=True)`` (what ``torchrun -m duogard compare`` runs): both ranks see
    the global loss of every step, equal to the single-process comparison's (float32, 1e-5)."""
    if "torch" not in runs:
        pytest.skip("needs torch")
    r0, r1 = (runs["torch"][r]["compare"] for r in range(2))
    assert r0["world"] == r1["world"] == 2
    assert r0["losses"] == r1["losses"]
    assert len(r0["losses"]) == len(r0["single"]) == 2
    for got, ref in zip(r0["losses"], r0["single"]):
        assert len(got) == len(ref) == 4
        assert max(abs(a - b) / abs(b) for a, b in zip(got, ref)) <= 1e-5, (got, ref)


def test_clear_errors_without_a_launch(monkeypatch, digits):
    import duogard as dg
    from duogard.train import DataParallel, DistributedError

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    model = dg.train.build_model("logreg", 10)
    params = model.init(0, digits.example_input)
    with pytest.raises(
        DistributedError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not set.*torchrun"
    ):
        dg.fit(model, params, digits, backend="torch", steps=1, callbacks=[], distributed=True)
    with pytest.raises(TypeError, match="distributed must be True, False or a DataParallel"):
        dg.fit(model, params, digits, backend="torch", steps=1, callbacks=[], distributed="yes")
    with pytest.raises(ValueError, match="tangents must be one of"):
        DataParallel(tangents="each")
    with pytest.raises(ValueError, match="timeout must be positive"):
        DataParallel(timeout=0)


def test_a_model_with_a_training_mode_is_refused_not_trained_differently(monkeypatch):
    """Per-shard dropout masks and batch statistics would silently change the run."""
    import duogard as dg
    from duogard import nn

    one_rank_env(monkeypatch)  # no group joined
    model = nn.Sequential(nn.Flatten(), nn.Linear(8), nn.Dropout(0.5), nn.Linear(3))
    trainer = dg.Trainer(model, backend="torch")
    with pytest.raises(ValueError, match="training mode.*single-process"):
        dg.train.DataParallel().setup(trainer, batch_size=4)


def test_the_roll_call_names_the_ranks_that_never_answer():
    """After a failed collective among more than two ranks, each survivor marks itself present
    in the launch's store (here a real torch TCPStore, as torchrun's agent hosts it) and names
    the ranks that never answer: rank 1 of 4 is dead, ranks 0 and 3 answered before, 2 asks."""
    import datetime

    import torch.distributed as tdist

    from duogard.backend._contract_dist import roll_call
    from duogard.train import DataParallel

    store = tdist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=10))
    for r in (0, 3):
        store.set(f"duogard/roll-call/0/7/{r}", "1")
    present = roll_call(lambda k: store.set(k, "1"), lambda k: store.check([k]), "0/7", 2, 4, 0.3)
    assert present == [0, 2, 3]
    assert store.check(["duogard/roll-call/0/7/2"])  # 2 answered for the others to see

    class FakeBackend:  # what DataParallel.failure asks of the backend
        def dist_roll_call(self, tag, wait):
            assert tag == "0/7" and 0 < wait <= 3
            return present

    dp = DataParallel(timeout=30)
    dp.rank, dp.world_size, dp.current_step, dp._be = 2, 4, 7, FakeBackend()
    err = dp.failure(RuntimeError("Connection closed by peer"), "the collective of step 7")
    assert "rank 2 of 4" in str(err) and "rank 1 stopped" in str(err), str(err)
    dp._be = None  # no store reachable: the survivors say who might have
    assert "one of ranks [0, 1, 3]" in str(dp.failure(RuntimeError("x"), "y"))


_JAX_ROLL_CALL = textwrap.dedent(
    """
    import os, sys
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    import duogard as dg
    from jax._src.distributed import global_state
    import duogard_jax._distributed as jd
    be = dg.backend("jax")
    assert be.dist_roll_call("t", 0.1) is None  # no group joined: no store to ask
    be.dist_init(30)
    assert be.dist_roll_call("t", 0.1) == [0]
    global_state.client.key_value_set("duogard/roll-call/u/2", "1")  # rank 2 answered, 1 did not
    jd.dist_world = lambda: (0, 3)
    print("ROLL", be.dist_roll_call("u", 0.3))
    be.dist_shutdown()
    """
)


def test_jax_roll_call_uses_the_coordination_service(tmp_path):
    """JAX's roll call marks and reads keys in jax.distributed's coordination service (a
    one-process group here, with the world widened to 3 after it joined)."""
    pytest.importorskip("jax")
    script = tmp_path / "roll.py"
    script.write_text(_JAX_ROLL_CALL)
    env = dict(os.environ, PYTHONPATH=child_pythonpath())
    proc = subprocess.run(
        [sys.executable, str(script), str(free_port())], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "ROLL [0, 2]" in proc.stdout, proc.stdout[-2000:]
