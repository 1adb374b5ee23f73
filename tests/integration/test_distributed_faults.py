"""Data-parallel runs that go wrong, on both backends: a rank that stalls, dies or never joins,
and ranks launched with different model sizes.

Each survivor must fail through duogard: one line naming the rank that stopped and the timeout,
a checkpoint of the last good step with ``--checkpoint``, exit 1. On JAX the coordination service
used to abort rank 0 first (SIGABRT and a C++ stack, no checkpoint, no rank named), and a
stalled peer hung XLA's collectives for 30 minutes whatever ``--dist-timeout`` said.

The stall and the death are a test hook in a wrapper of ``duogard.cli.main`` (rank 1 sleeps, or
exits, before its step 3); the ranks are two processes with the launch variables torchrun sets,
started by the test itself, so that no agent stops the survivor before it has said what it
says. The differing model size is launched by torchrun.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import AVAILABLE, child_pythonpath, free_port

TORCHRUN = Path(sys.executable).with_name("torchrun")
TINY = ["train", "--steps", "6", "--hidden", "8", "--batch-size", "16", "--quiet"]
#: --dist-timeout of the stall: long enough for a loaded machine's start-up skew between ranks
TIMEOUT = 10

# rank 1's faults; every rank then runs the command line
_HOOK = textwrap.dedent(
    """
    import os, sys, time
    fault, argv = sys.argv[1], sys.argv[2:]
    if os.environ["RANK"] == "1":
        if fault == "hidden":  # a different model size on rank 1
            argv = [*argv, "--hidden", "16"]
        elif fault in ("stall", "die"):
            from duogard.train import DataParallel
            before = DataParallel.before_step

            def hook(self, run, step, x, y, key):
                if step + 1 == 3:
                    print(f"rank 1: {fault} before step 3", flush=True)
                    if fault == "die":
                        os._exit(3)
                    time.sleep(float(os.environ["STALL_SECONDS"]))
                return before(self, run, step, x, y, key)

            DataParallel.before_step = hook
    from duogard.cli import main
    sys.exit(main(argv))
    """
)

_ABORTS = ("Check failure stack trace", "Terminating process", "EnforceNotMet", "Traceback")


@pytest.fixture
def hook(tmp_path):
    path = tmp_path / "hook.py"
    path.write_text(_HOOK)
    return path


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=child_pythonpath(), OMP_NUM_THREADS="1", **extra)


def _ranks(hook: Path, fault: str, args: list[str], ranks=(0, 1), **env) -> list[subprocess.Popen]:
    """The ranks of a 2-rank launch, as torchrun would start them (``ranks``: which of them)."""
    port = free_port()
    procs = []
    for rank in ranks:
        launch = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, str(hook), fault, *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=_env(**launch, **env),
            )
        )
    return procs


def _wait(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"a rank did not finish in {timeout} s:\n{out[-4000:]}")
    return out


def _stop(proc: subprocess.Popen) -> None:
    """Stop a rank the test started and no longer needs (the stalled one)."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("fault", ["stall", "die"])
def test_a_stalled_or_dead_rank_stops_rank_0_through_duogard(hook, tmp_path, backend, fault):
    ck = tmp_path / "ck"
    args = [*TINY, "--backend", backend, "--dist-timeout", str(TIMEOUT), "--checkpoint", str(ck)]
    zero, one = _ranks(hook, fault, args, STALL_SECONDS=str(6 * TIMEOUT))
    start = time.monotonic()
    out = _wait(zero, timeout=8 * TIMEOUT)
    took = time.monotonic() - start
    _stop(one)
    assert zero.returncode == 1, out[-4000:]
    said = f"the collective of step 3 failed: rank 1 stopped or did not answer within {TIMEOUT} s"
    assert f"rank 0 of 2: {said}" in out, out[-4000:]
    assert not any(a in out for a in _ABORTS), out[-4000:]
    # the last good step is saved
    assert json.loads((ck / "checkpoint.json").read_text())["step"] == 2, out[-4000:]
    if fault == "stall":  # the run's timeout bounds the wait, not the collective's own (30 min on XLA)
        assert took < 5 * TIMEOUT, (took, out[-2000:])


@pytest.mark.parametrize("backend", AVAILABLE)
def test_a_rank_that_never_joins_is_a_clear_error_naming_the_timeout(hook, backend):
    (zero,) = _ranks(hook, "none", [*TINY, "--backend", backend, "--dist-timeout", "4"], ranks=(0,))
    out = _wait(zero, timeout=90)
    assert zero.returncode == 1, out[-4000:]
    said = "rank 0 of 2 could not join"
    assert said in out and "within 4 s (DataParallel(timeout=...), --dist-timeout)" in out, out[-4000:]
    assert not any(a in out for a in ("Check failure stack trace", "Terminating process")), out[-4000:]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="needs torchrun (torch) as the launcher")
@pytest.mark.parametrize("backend", AVAILABLE)
def test_a_rank_with_another_model_size_is_refused_naming_the_flag(hook, backend):
    """torchrun starts one command on every rank; rank 1's wrapper adds ``--hidden 16``. The ranks
    compare their configuration before the first step: each names the flag, none crashes in gloo
    (rank 1's larger gradient once died in gloo with EnforceNotMet, blaming the wrong rank).
    """
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--monitor-interval", "1", str(hook), "hidden",
           *TINY, "--backend", backend, "--dist-timeout", "60"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    said = "the ranks do not run the same configuration: --hidden (rank(s) [1] differ from rank 0)"
    assert out.count(said) == 2, out[-4000:]  # both ranks say it
    assert "EnforceNotMet" not in out and "Check failure stack trace" not in out, out[-4000:]


@pytest.mark.parametrize("backend", AVAILABLE)
def test_sigterm_stops_the_ranks_with_a_checkpoint(hook, tmp_path, backend):
    """SIGTERM (what torchrun and schedulers send) ends a data-parallel run like Ctrl-C: rank 0
    writes the step it reached and exits 143. On JAX the preemption service of jax.distributed
    took SIGTERM in C++ (duogard's handler never ran: no checkpoint, killed 30 s later).
    """
    ck = tmp_path / "ck"
    args = [*TINY, "--steps", "100000", "--backend", backend, "--dist-timeout", "30",
            "--checkpoint", str(ck), "--checkpoint-every", "20"]  # fmt: skip
    procs = _ranks(hook, "none", args)
    deadline = time.monotonic() + 90
    while not (ck / "checkpoint.json").exists():  # the run is under way
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint"
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    out = _wait(procs[0], timeout=60)
    _wait(procs[1], timeout=60)
    assert procs[0].returncode == 143, out[-4000:]
    assert "terminated (SIGTERM)" in out and "checkpoint written" in out, out[-4000:]
    assert json.loads((ck / "checkpoint.json").read_text())["step"] >= 20
