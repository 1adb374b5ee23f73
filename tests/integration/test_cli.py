"""The ``duogard`` command: help everywhere, exit code 2 on usage errors, and tiny real runs."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from duogard.cli import main
from duogard.methods import DEFAULT_METHODS

from helpers import AVAILABLE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(argv) -> int:
    """``main(argv)``'s exit code, whether it returns it or argparse exits."""
    try:
        return main(list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    "argv,mentions",
    [
        ([], ["train", "compare", "bench", "parity", "--debug"]),
        (
            ["train"],
            [
                "--backend",
                "--grad",
                "--model",
                "--dataset",
                "--steps",
                "--log",
                "--json",
                "--resume",
                "--on-nan",
                "--quiet",
            ],
        ),
        (["compare"], ["--backends", "--methods", "--steps", "--out", "--hidden", *DEFAULT_METHODS[:1]]),
        (["bench"], ["--quick", "--json"]),
        (["parity"], ["--backends", "--grad", "--optimizer", "--dtype", "--tol", "--steps"]),
    ],
)
def test_help(capsys, argv, mentions):
    assert run([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: duogard")
    for word in mentions:
        assert word in out


def test_no_command_prints_help_and_exits_2(capsys):
    assert run([]) == 2
    assert "usage: duogard" in capsys.readouterr().out


def test_console_script_help():
    exe = Path(sys.executable).with_name("duogard")
    if not exe.exists():
        pytest.skip("the duogard console script is not installed next to this Python")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: duogard" in proc.stdout and "compare" in proc.stdout


# ----------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    "argv,message",
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["train", "--grad", "nope"], "unknown gradient method 'nope'"),
        (["train", "--grad", "forward:num_tangents=0"], "num_tangents must be a positive int, got 0"),
        (["train", "--grad", "forward:bogus=1"], "bogus"),
        (["train", "--grad", "forward:num_tangents"], "expected option=value"),
        (["train", "--hidden", "a,b"], "--hidden must be comma-separated ints, got 'a,b'"),
        (["train", "--hidden", "0"], "--hidden must be positive ints"),
        (["parity", "--hidden", "x"], "--hidden must be comma-separated ints"),
        (["compare", "--hidden", "16,-2"], "--hidden must be positive ints"),
        (["train", "--model", "resnet"], "invalid choice: 'resnet'"),
        (["train", "--dataset", "cifar"], "unknown dataset 'cifar'"),
        (["train", "--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
        (["train", "--steps", "ten"], "invalid int value: 'ten'"),
        (["compare", "--methods", "backprop;nope"], "unknown gradient method 'nope'"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, message):
    assert run([*argv, "--steps", "1"] if "--steps" not in argv else argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_missing_mnist_dir_lists_the_needed_files(capsys, tmp_path):
    assert run(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        assert name in err
    assert "nowhere" in err


# ----------------------------------------------------------------------------- real (tiny) runs


def test_train_writes_json_and_log(be, capsys, tmp_path):
    js, log = tmp_path / "run.json", tmp_path / "run.csv"
    rc = run(
        [
            "train",
            "--backend",
            be.name,
            "--steps",
            "20",
            "--hidden",
            "8",
            "--batch-size",
            "32",
            "--grad",
            "forward:num_tangents=2",
            "--optimizer",
            "adam",
            "--eval-every",
            "10",
            "--quiet",
            "--json",
            str(js),
            "--log",
            str(log),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "MLP 64-8-10 (" in out and "on digits:" in out and "20 steps of 32" in out
    assert f"{be.name} forward(num_tangents=2): final loss" in out
    s = json.loads(js.read_text())
    assert s["backend"] == be.name and s["steps"] == 20 and s["method"] == "forward(num_tangents=2)"
    assert 0.0 <= s["test_accuracy"] <= 1.0 and s["final_loss"] > 0
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    assert [r["step"] for r in rows if r["test_accuracy"]] == ["10", "20"]


def test_train_checkpoint_then_resume(capsys, tmp_path):
    ck, js = tmp_path / "ck", tmp_path / "s.json"
    base = ["train", "--hidden", "8", "--batch-size", "32", "--quiet", "--optimizer", "momentum"]
    assert run([*base, "--steps", "10", "--checkpoint", str(ck)]) == 0
    assert (ck / "checkpoint.json").is_file()
    assert run([*base, "--steps", "15", "--resume", str(ck), "--json", str(js)]) == 0
    assert json.loads(js.read_text())["steps"] == 15


def test_train_non_finite_exits_1(capsys):
    assert run(["train", "--hidden", "8", "--steps", "50", "--lr", "1e30", "--quiet"]) == 1
    assert "non-finite" in capsys.readouterr().err


def test_compare_writes_json_png_and_table(capsys, tmp_path):
    out = tmp_path / "cmp"
    assert run(["compare", "--steps", "30", "--hidden", "16", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out

    result = json.loads((out / "compare.json").read_text())
    combos = sorted((r["backend"], r["method"]) for r in result["runs"])
    labels = result["config"]["methods"]
    assert len(labels) == len(DEFAULT_METHODS)
    assert combos == sorted((b, m) for b in AVAILABLE for m in labels)
    for r in result["runs"]:
        assert r["steps"] == 30 and len(r["history"]) == 30
        assert 0.0 <= r["test_accuracy"] <= 1.0
        # the method's own memory, and the process's RSS under its own name
        assert r["step_memory_bytes"] > 0 and r["process_rss_peak_bytes"] >= 0
    assert (out / "compare.png").read_bytes()[:8] == PNG_MAGIC
    if len(AVAILABLE) == 2:
        # portable tangents: every method, forward ones included, runs the same trajectory on
        # both backends (before, each backend drew its own tangents and the rows differed)
        for label in labels:
            a, b = ([h["loss"] for h in r["history"]] for r in result["runs"] if r["method"] == label)
            np.testing.assert_allclose(a, b, rtol=1e-4, err_msg=label)

    lines = printed.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("backend"))
    for col in ("method", "final loss", "test acc", "ms/step", "total s", "step MB", "cosine"):
        assert col in lines[head]
    assert set(lines[head + 1].replace(" ", "")) == {"-"}
    assert len(
        [line for line in lines[head + 2 :] if line.split()[:1] and line.split()[0] in AVAILABLE]
    ) == len(result["runs"])
    assert f"wrote {out / 'compare.png'}" in printed


def test_parity_prints_the_table(capsys):
    if len(AVAILABLE) < 2:
        pytest.skip("needs both jax and torch")
    assert run(["parity", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "step" in out and "param rel" in out and "grad rel" in out
    assert "jax vs torch (float32): agree within rel 0.0001 for 5 steps" in out


def _steps_and_losses(path):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def test_train_resume_continues_exactly(be, capsys, tmp_path):
    """10 steps, then --resume for 5 more == 15 steps in one go (the same steps, losses and params)."""
    from duogard.train import load_checkpoint

    base = ["train", "--backend", be.name, "--hidden", "8", "--batch-size", "16", "--quiet"]
    base += ["--optimizer", "momentum", "--grad", "forward:num_tangents=2"]
    whole, first, rest = tmp_path / "whole", tmp_path / "first", tmp_path / "rest"
    assert (
        run([*base, "--steps", "15", "--checkpoint", str(whole), "--log", str(tmp_path / "whole.jsonl")]) == 0
    )
    assert run([*base, "--steps", "10", "--checkpoint", str(first)]) == 0
    resumed = ["--steps", "15", "--resume", str(first), "--checkpoint", str(rest)]
    assert run([*base, *resumed, "--log", str(tmp_path / "rest.jsonl")]) == 0
    capsys.readouterr()

    steps, losses = _steps_and_losses(tmp_path / "rest.jsonl")
    assert steps == [11, 12, 13, 14, 15]  # it went on from step 10, not from the start
    whole_steps, whole_losses = _steps_and_losses(tmp_path / "whole.jsonl")
    np.testing.assert_allclose(losses, whole_losses[10:], rtol=1e-6)
    a, b = load_checkpoint(whole), load_checkpoint(rest)
    assert a.step == b.step == 15
    for x, y in zip(_leaves(a.params), _leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def _leaves(tree):
    """The leaves of a loaded checkpoint's pytree (NumPy arrays), in order."""
    import optree

    return [np.asarray(leaf) for leaf in optree.tree_leaves(tree)]


# ----------------------------------------------------------------------------- Ctrl-C


def test_sigint_stops_train_after_the_step_and_checkpoints(tmp_path):
    """Ctrl-C in `duogard train`: the step ends, the checkpoint is written, one line, exit 130."""
    from duogard.train import load_checkpoint

    ck, log = tmp_path / "ck", tmp_path / "log.jsonl"
    # Python's own SIGINT handler, as in a terminal, whatever the disposition the test runner left
    sigint = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)"
    main_ = "from duogard.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", f"{sigint}; {main_}", "train", "--hidden", "8", "--batch-size", "8"]
    argv += ["--steps", "200000", "--eval-every", "100000", "--quiet"]
    argv += ["--checkpoint", str(ck), "--log", str(log), "--json", str(tmp_path / "s.json")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and log.stat().st_size > 0):  # the log's first buffer: steps ran
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    match = re.search(
        rf"duogard train: interrupted at step (\d+); checkpoint written to {re.escape(str(ck))}$", err
    )
    assert match, err
    step = int(match.group(1))
    assert 0 < step < 200000
    assert load_checkpoint(ck).step == step
    assert len(log.read_text().splitlines()) == step  # every step taken is logged
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["interrupted"] is True and summary["steps"] == step
    assert "final loss" in out  # the summary of the steps taken


@pytest.mark.integration
def test_sigterm_stops_train_after_the_step_and_checkpoints(tmp_path):
    """SIGTERM (schedulers, containers, torchrun) is Ctrl-C's twin: the step ends, the checkpoint
    is written without --checkpoint-every, one line, exit 143 (128 + 15)."""
    from duogard.train import load_checkpoint

    ck, log = tmp_path / "ck", tmp_path / "log.jsonl"
    argv = [sys.executable, "-m", "duogard", "train", "--hidden", "8", "--batch-size", "8", "--quiet"]
    argv += ["--steps", "200000", "--eval-every", "100000", "--checkpoint", str(ck), "--log", str(log)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and log.stat().st_size > 0):  # steps ran
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    match = re.search(
        rf"duogard train: terminated \(SIGTERM\) at step (\d+); checkpoint written to {re.escape(str(ck))}$",
        err,
    )
    assert match, err
    assert 0 < int(match.group(1)) < 200000 and load_checkpoint(ck).step == int(match.group(1))


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt), whatever the test runner left, restored after."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_sigint_stops_compare_and_keeps_the_runs_so_far(python_sigint, capsys, tmp_path, monkeypatch):
    """Ctrl-C in `duogard compare` (sent at step 3 of the first run): that run ends, the others are
    skipped, the table and files hold what ran, exit 130."""
    from duogard.cli._interrupt import InterruptGuard

    callback = InterruptGuard.callback

    def sending(self):
        cb = callback(self)
        step_end = cb.on_step_end

        def on_step_end(run, record):
            if record["step"] == 3:
                os.kill(os.getpid(), signal.SIGINT)
            step_end(run, record)

        cb.on_step_end = on_step_end
        return cb

    monkeypatch.setattr(InterruptGuard, "callback", sending)
    out_dir = tmp_path / "cmp"
    argv = ["compare", "--steps", "50", "--hidden", "8", "--out", str(out_dir), "--quiet"]
    assert run([*argv, "--methods", "backprop;forward"]) == 130
    out, err = capsys.readouterr()
    result = json.loads((out_dir / "compare.json").read_text())
    assert result["config"]["interrupted"] is True
    assert [r["steps"] for r in result["runs"]] == [3]
    assert "duogard compare: interrupted after 1 of" in err and "at step 3" in err
    assert "ms/step" in out and f"wrote {out_dir / 'compare.json'}" in out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_interrupt_guard_second_ctrl_c_interrupts_at_once(python_sigint):
    from duogard.cli._interrupt import InterruptGuard

    with InterruptGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes
        assert guard.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_command_under_torchrun_leaves_its_process_groups(monkeypatch):
    """train and compare end by leaving the groups they joined (a gloo group torn down at exit
    can abort a finished process), and only when they ran data-parallel; also after an error."""
    import argparse

    from duogard.cli import _options

    left = []
    monkeypatch.setattr(_options, "leave_process_groups", lambda: left.append(1))
    args = argparse.Namespace(distributed="auto")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert _options.run_in_group(lambda a: 0, args) == 0 and left == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _options.run_in_group(lambda a: 3, args) == 3 and left == [1]
    with pytest.raises(RuntimeError, match="boom"):
        _options.run_in_group(lambda a: (_ for _ in ()).throw(RuntimeError("boom")), args)
    assert left == [1, 1]
    assert _options.run_in_group(lambda a: 0, argparse.Namespace(distributed="off")) == 0 and left == [1, 1]
