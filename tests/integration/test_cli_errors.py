"""The ``duogard`` command's bad inputs, one table: each row's exit code and the flag its message names.

Exit 2 (a usage error) comes before any work: nothing is printed on stdout, no traceback. Exit 1
is a run that failed (an output that could not be written at the end, an error inside duogard:
one line with the ``--debug`` hint). ``{tmp}`` in an argument is the test's temporary directory,
``{file}`` a file in it and ``{ro}`` a read-only directory in it.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

import duogard as dg
from duogard.cli import main

from helpers import AVAILABLE

TINY = {
    "train": ["--steps", "2", "--hidden", "8", "--batch-size", "16", "--quiet"],
    "compare": ["--steps", "2", "--hidden", "8", "--batch-size", "16", "--quiet", "--methods", "backprop"],
    "parity": ["--steps", "1", "--hidden", "8", "--batch-size", "16"],
    "bench": [],
}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_permissions = pytest.mark.skipif(IS_ROOT, reason="root ignores file permissions")
needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")


def _raise(exc):
    def boom(*args, **kwargs):
        raise exc

    return boom


def _internal(exc):
    """A patch that makes the library fail inside the run (the first evaluation)."""
    return lambda mp: mp.setattr(dg.train.Trainer, "evaluate", _raise(exc))


def _disk_full(mp):
    mp.setattr("duogard.comparison.plot_runs", _raise(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))


def _disk_full_after(saves: int):
    """A patch: the checkpoint writer's files after the first ``saves`` saves get half their bytes
    written, then the disk is full (what a full disk does to a write).
    """

    def patch(mp):
        from duogard.train import _checkpoint_io

        real, calls = _checkpoint_io.write_file, []

        def write_file(path, data):
            calls.append(path)
            if len(calls) <= 2 * saves:  # a save writes two files: the tensors, then the manifest
                return real(path, data)
            real(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        mp.setattr(_checkpoint_io, "write_file", write_file)

    return patch


def _env(name: str, value: str):
    return lambda mp: mp.setenv(name, value)


LONG = "n" * 300  # a name longer than any file system allows (255 bytes)


# (id, argv, exit code, what stderr must contain[, a patch of the library][, marks])
ROWS = [
    # gradient methods (--grad, --methods)
    (
        "grad-unknown-option",
        ["train", "--grad", "forward:bogus=1"],
        2,
        "--grad: 'forward' has no option 'bogus'",
    ),
    (
        "grad-unknown-option-lists-valid",
        ["train", "--grad", "forward:bogus=1"],
        2,
        "num_tangents, distribution",
    ),
    ("grad-lr-not-a-number", ["train", "--grad", "forward:lr=abc"], 2, "--grad: option lr must be a number"),
    ("grad-lr-not-positive", ["train", "--grad", "forward:lr=-1"], 2, "--grad: option lr must be > 0"),
    (
        "grad-int-option",
        ["train", "--grad", "forward:num_tangents=abc"],
        2,
        "num_tangents of 'forward' must be an int",
    ),
    (
        "grad-int-option-float",
        ["train", "--grad", "forward:num_tangents=2.5"],
        2,
        "must be an int, got '2.5'",
    ),
    ("grad-bool-option", ["train", "--grad", "forward-activity:layerwise=maybe"], 2, "must be true or false"),
    (
        "grad-bad-choice",
        ["train", "--grad", "forward:distribution=uniform"],
        2,
        "--grad: forward: distribution",
    ),
    ("grad-no-name", ["train", "--grad", ":lr=0.1"], 2, "--grad: a method name is missing"),
    ("grad-no-value", ["train", "--grad", "forward:num_tangents"], 2, "--grad: expected option=value"),
    ("methods-empty", ["compare", "--methods", ";"], 2, "--methods: expected one or more methods"),
    ("methods-blank", ["compare", "--methods", " ; ;"], 2, "--methods: expected one or more methods"),
    ("methods-no-name", ["compare", "--methods", "backprop;:lr=1"], 2, "--methods: a method name is missing"),
    (
        "methods-unknown-option",
        ["compare", "--methods", "forward:k=2"],
        2,
        "--methods: 'forward' has no option",
    ),
    # numbers
    ("train-eval-every-negative", ["train", "--eval-every", "-1"], 2, "--eval-every must be a positive int"),
    ("train-eval-every-zero", ["train", "--eval-every", "0"], 2, "--eval-every must be a positive int"),
    (
        "train-checkpoint-every-zero",
        ["train", "--checkpoint", "{tmp}/ck", "--checkpoint-every", "0"],
        2,
        "--checkpoint-every must be a positive int",
    ),
    (
        "train-checkpoint-every-alone",
        ["train", "--checkpoint-every", "5"],
        2,
        "--checkpoint-every needs --checkpoint",
    ),
    (
        "train-diagnostics-every-negative",
        ["train", "--diagnostics-every", "-1"],
        2,
        "--diagnostics-every must be >= 0",
    ),
    (
        "compare-diagnostics-every-negative",
        ["compare", "--diagnostics-every", "-1"],
        2,
        "--diagnostics-every",
    ),
    ("parity-every-zero", ["parity", "--every", "0"], 2, "--every must be a positive int"),
    ("parity-one-backend", ["parity", "--backends", "jax"], 2, "--backends must name two backends"),
    ("parity-tol", ["parity", "--tol", "0"], 2, "--tol must be a positive number"),
    ("train-batch-size-zero", ["train", "--batch-size", "0"], 2, "--batch-size must be > 0"),
    ("train-steps-zero", ["train", "--steps", "0"], 2, "--steps must be a positive int, got 0"),
    ("compare-steps-zero", ["compare", "--steps", "0"], 2, "--steps must be a positive int, got 0"),
    ("train-dist-timeout-inf", ["train", "--dist-timeout", "inf"], 2, "--dist-timeout must be finite"),
    ("train-dist-timeout-huge", ["train", "--dist-timeout", "1e300"], 2, "--dist-timeout must be finite"),
    ("compare-dist-timeout-inf", ["compare", "--dist-timeout", "inf"], 2, "--dist-timeout must be finite"),
    ("train-max-skipped-above-1", ["train", "--max-skipped", "2"], 2, "--max-skipped must be a fraction"),
    ("train-max-skipped-nan", ["train", "--max-skipped", "nan"], 2, "--max-skipped must be a fraction"),
    *[
        (
            f"torch-threads-{v}",
            [cmd],
            2,
            f"$DUOGARD_TORCH_THREADS must be a positive int of at most 1024 threads, got '{v}'",
            _env("DUOGARD_TORCH_THREADS", v),
        )
        for v, cmd in (("100000", "train"), ("0", "train"), ("-1", "compare"), ("abc", "train"))
    ],  # fmt: skip
    (
        "train-allow-change-without-resume",
        ["train", "--allow-change", "lr"],
        2,
        "--allow-change only applies with --resume",
    ),
    ("train-lr-negative", ["train", "--lr", "-0.1"], 2, "--lr must be > 0"),
    ("compare-decay-negative", ["compare", "--decay", "-1"], 2, "--decay must be >= 0"),
    # backends and data
    ("train-backend-unknown", ["train", "--backend", "nope"], 2, "--backend nope: backend: unknown backend"),
    ("compare-backend-unknown", ["compare", "--backends", "nope"], 2, "--backends nope"),
    (
        "train-data-dir-missing",
        ["train", "--dataset", "mnist", "--data-dir", "{tmp}/none"],
        2,
        "train-images-idx3",
    ),
    # output paths: checked before any work
    (
        "checkpoint-is-a-file",
        ["train", "--checkpoint", "{file}"],
        2,
        "--checkpoint {file}: exists and is not a dir",
    ),
    (
        "checkpoint-under-a-file",
        ["train", "--checkpoint", "{file}/ck"],
        2,
        "--checkpoint {file}/ck: cannot be created",
    ),
    ("json-is-a-directory", ["train", "--json", "{tmp}"], 2, "--json {tmp}: is a directory"),
    (
        "json-under-a-file",
        ["train", "--json", "{file}/s.json"],
        2,
        "--json {file}/s.json: its directory {file}",
    ),
    ("log-under-a-file", ["train", "--log", "{file}/log.csv"], 2, "--log {file}/log.csv"),
    ("log-suffix", ["train", "--log", "{tmp}/log.txt"], 2, "--log {tmp}/log.txt: the file must end in .csv"),
    (
        "checkpoint-name-too-long",
        ["train", "--checkpoint", f"{{tmp}}/{LONG}"],
        2,
        "is 300 bytes, longer than",
    ),
    ("json-name-too-long", ["train", "--json", f"{{tmp}}/{LONG}.json"], 2, "--json {tmp}/nnnn"),
    ("log-dir-name-too-long", ["train", "--log", f"{{tmp}}/{LONG}/l.csv"], 2, "--log {tmp}/nnnn"),
    ("resume-name-too-long", ["train", "--resume", f"{{tmp}}/{LONG}"], 2, "--resume {tmp}/nnnn"),
    ("compare-out-name-too-long", ["compare", "--out", f"{{tmp}}/{LONG}"], 2, "--out {tmp}/nnnn"),
    ("resume-missing", ["train", "--resume", "{tmp}/none"], 2, "--resume {tmp}/none: no such checkpoint"),
    (
        "resume-not-a-checkpoint",
        ["train", "--resume", "{tmp}"],
        2,
        "--resume {tmp}: not a duogard checkpoint",
    ),
    (
        "compare-out-is-a-file",
        ["compare", "--out", "{file}"],
        2,
        "--out {file}: exists and is not a directory",
    ),
    ("bench-json-under-a-file", ["bench", "--json", "{file}/b.json"], 2, "--json {file}/b.json"),
    (
        "json-read-only-dir",
        ["train", "--json", "{ro}/s.json"],
        2,
        "--json {ro}/s.json: cannot write in",
        None,
        needs_permissions,
    ),
    (
        "log-read-only-dir",
        ["train", "--log", "{ro}/sub/log.csv"],
        2,
        "--log {ro}/sub/log.csv",
        None,
        needs_permissions,
    ),
    (
        "checkpoint-read-only-dir",
        ["train", "--checkpoint", "{ro}"],
        2,
        "--checkpoint {ro}: cannot write in",
        None,
        needs_permissions,
    ),
    (
        "compare-out-read-only-dir",
        ["compare", "--out", "{ro}"],
        2,
        "--out {ro}: cannot write",
        None,
        needs_permissions,
    ),
]

BACKEND_ROWS = [  # these reach the run: once on each backend
    ("batch-larger-than-data", ["train", "--batch-size", "5000"], 2, "--batch-size 5000 is larger than"),
    (
        "skipped-most-steps",
        ["train", "--on-nan", "skip", "--lr", "1e30", "--steps", "4"],
        1,
        "error: the run skipped 3 of its 4 steps (75%), more than --max-skipped 0.5",
    ),
    (
        "checkpoint-disk-full",
        ["train", "--checkpoint", "{tmp}/ck", "--checkpoint-every", "1"],
        1,
        "error: save_checkpoint: could not write the checkpoint of step 2 in {tmp}/ck: No space left on "
        "device; the previous checkpoint (step 1) is intact",
        _disk_full_after(1),
    ),
    (
        "json-disk-full",
        ["train", "--json", "/dev/full"],
        1,
        "could not write --json /dev/full: No space left",
        None,
        needs_dev_full,
    ),
    (
        "compare-out-disk-full",
        ["compare", "--out", "{tmp}/cmp"],
        1,
        "could not write --out {tmp}/cmp: No space",
        _disk_full,
    ),
    (
        "internal-type-error",
        ["train", "--eval-every", "1"],
        1,
        "error: TypeError: boom (run with --debug",
        _internal(TypeError("boom")),
    ),
    (
        "internal-value-error",
        ["train", "--eval-every", "1"],
        1,
        "error: ValueError: boom (run with --debug",
        _internal(ValueError("boom")),
    ),
    (
        "internal-error-debug",
        ["--debug", "train", "--eval-every", "1"],
        1,
        "Traceback (most recent call last)",
        _internal(TypeError("boom")),
    ),
    (
        "internal-error-debug-after",
        ["train", "--eval-every", "1", "--debug"],
        1,
        "Traceback",
        _internal(TypeError("boom")),
    ),
]


def _params():
    rows = [(row, None) for row in ROWS]
    rows += [(row, name) for name in AVAILABLE for row in BACKEND_ROWS]
    for (rid, argv, code, needle, *rest), backend in rows:
        patch, marks = (rest[0] if rest else None), rest[1:]
        if backend is not None:
            argv = [*argv, "--backends" if "compare" in argv else "--backend", backend]
            rid = f"{rid}-{backend}"
        yield pytest.param(argv, code, needle, patch, id=rid, marks=marks)


@pytest.fixture
def paths(tmp_path):
    file = tmp_path / "a-file"
    file.write_text("not a directory")
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o500)
    yield {"tmp": str(tmp_path), "file": str(file), "ro": str(ro)}
    ro.chmod(0o700)


@pytest.mark.parametrize("argv,code,needle,patch", list(_params()))
def test_bad_input(argv, code, needle, patch, paths, capsys, monkeypatch):
    monkeypatch.chdir(paths["tmp"])
    if patch is not None:
        patch(monkeypatch)
    argv = [a.format(**paths) for a in argv]
    command = next(a for a in argv if a in TINY)
    at = argv.index(command) + 1
    argv = [*argv[:at], *TINY[command], *argv[at:]]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    out, err = capsys.readouterr()
    assert rc == code, err
    assert needle.format(**paths) in err
    assert err.startswith(f"duogard {command}: ") or "--debug" in argv
    if "--debug" not in argv:
        assert "Traceback" not in err
    if code == 1 and "--debug" not in argv:
        assert len(err.strip().splitlines()) == 1, err  # one line says it all
    if code == 2:
        assert out == ""  # refused before any work
    if "could not write --" in needle:  # an output at the end (not a checkpoint during the run)
        assert "ms/step" in out  # the run's summary (or table) was printed all the same


def test_checks_leave_nothing_behind(tmp_path, capsys):
    """The output checks create the directories but no file: a refused run leaves no empty output."""
    target = tmp_path / "out" / "s.json"
    assert main(["train", "--json", str(target), "--log", str(tmp_path / "l.csv"), "--grad", "nope"]) == 2
    assert "unknown gradient method 'nope'" in capsys.readouterr().err
    assert target.parent.is_dir() and list(target.parent.iterdir()) == []
    assert not (tmp_path / "l.csv").exists()


def test_resume_from_another_model_is_a_usage_error(be, tmp_path, capsys):
    ck = tmp_path / "ck"
    base = ["train", "--backend", be.name, "--steps", "2", "--batch-size", "16", "--quiet"]
    assert main([*base, "--hidden", "8", "--checkpoint", str(ck)]) == 0
    capsys.readouterr()
    assert main([*base, "--hidden", "16", "--resume", str(ck)]) == 2
    err = capsys.readouterr().err
    assert f"--resume {ck}: this run's flags differ from the checkpoint's run: --hidden 8 in the " in err
    # allowed, the weights still do not fit the model: the loader says so
    assert (
        main([*base, "--hidden", "16", "--resume", str(ck), "--allow-change", "hidden", "--steps", "4"]) == 2
    )
    err = capsys.readouterr().err
    assert f"--resume {ck}: load_checkpoint:" in err and "does not match" in err
    assert "Traceback" not in err


def _train(be, tmp_path, *argv, steps=2):
    base = ["train", "--backend", be.name, "--steps", str(steps), "--hidden", "8", "--batch-size", "16"]
    return main([*base, "--quiet", "--eval-every", "100", *argv])


def test_resume_refuses_other_flags_unless_allowed_and_records_the_change(be, tmp_path, capsys):
    from duogard.train import load_checkpoint

    ck = str(tmp_path / "ck")
    assert _train(be, tmp_path, "--checkpoint", ck, "--lr", "0.1", "--seed", "3") == 0
    flags = load_checkpoint(ck).config["run"]["flags"]
    assert flags["lr"] == 0.1 and flags["seed"] == 3 and flags["batch_size"] == 16
    capsys.readouterr()
    changed = ["--lr", "0.2", "--seed", "4", "--batch-size", "32", "--grad", "forward", "--decay", "0.5"]
    assert _train(be, tmp_path, "--resume", ck, "--checkpoint", ck, *changed, steps=4) == 2
    out, err = capsys.readouterr()
    assert out == ""
    expected = [
        "--lr 0.1 in the checkpoint, 0.2 now",
        "--seed 3 in the checkpoint, 4 now",
        "--batch-size 16 in the checkpoint, 32 now",
        "--grad backprop in the checkpoint, forward now",
        "--decay 0.0 in the checkpoint, 0.5 now",
        "--allow-change batch-size,seed,grad,lr,decay",
    ]
    for said in expected:
        assert said in err, err
    assert load_checkpoint(ck).step == 2  # nothing was written
    # the same flags continue; a deliberate change is allowed, said, and recorded with its step
    assert _train(be, tmp_path, "--resume", ck, "--checkpoint", ck, "--lr", "0.05", "--seed", "3",
                  "--allow-change=--lr", steps=4) == 0  # fmt: skip
    assert "--lr changed from 0.1 to 0.05 at step 2" in capsys.readouterr().out
    ckpt = load_checkpoint(ck)
    assert ckpt.step == 4 and ckpt.config["run"]["flags"]["lr"] == 0.05
    assert ckpt.config["run"]["changes"] == [{"step": 2, "flag": "--lr", "from": 0.1, "to": 0.05}]
    assert _train(be, tmp_path, "--resume", ck, "--allow-change", "speed", steps=6) == 2
    assert "--allow-change: unknown flag(s) speed" in capsys.readouterr().err


def test_resume_at_or_past_the_last_step_says_nothing_to_do(be, tmp_path, capsys):
    ck = str(tmp_path / "ck")
    assert _train(be, tmp_path, "--checkpoint", ck, steps=3) == 0
    capsys.readouterr()
    for steps in (3, 2):
        assert _train(be, tmp_path, "--resume", ck, "--json", str(tmp_path / "s.json"), steps=steps) == 0
        out, err = capsys.readouterr()
        assert out.strip() == f"--resume {ck}: already at step 3 of --steps {steps}, nothing to do"
        assert "nan" not in out + err and not (tmp_path / "s.json").exists()


def test_an_existing_checkpoint_is_not_replaced_without_overwrite(be, tmp_path, capsys):
    from duogard.train import load_checkpoint

    ck = str(tmp_path / "ck")
    assert _train(be, tmp_path, "--checkpoint", ck, steps=3) == 0
    capsys.readouterr()
    assert _train(be, tmp_path, "--checkpoint", ck, "--seed", "1") == 2
    out, err = capsys.readouterr()
    assert out == "" and f"--checkpoint {ck}: already holds a checkpoint (step 3)" in err
    assert "--overwrite" in err and load_checkpoint(ck).step == 3
    other = str(tmp_path / "other")
    assert _train(be, tmp_path, "--checkpoint", other) == 0
    assert _train(be, tmp_path, "--resume", other, "--checkpoint", ck, steps=4) == 2  # another run's
    assert _train(be, tmp_path, "--resume", f"{ck}/checkpoint.json", "--checkpoint", ck, steps=4) == 0
    assert load_checkpoint(ck).step == 4
    assert _train(be, tmp_path, "--checkpoint", ck, "--seed", "1", "--overwrite") == 0
    assert load_checkpoint(ck).step == 2 and load_checkpoint(ck).config["run"]["flags"]["seed"] == 1


def test_a_restarted_torchrun_group_may_reuse_its_checkpoint_directory(tmp_path, monkeypatch):
    """torchrun --max-restarts restarts the same command: its --checkpoint is its own (it resumes)."""
    from duogard.cli.train import _check_not_another_run
    from duogard.train import save_checkpoint

    ck = tmp_path / "ck"
    save_checkpoint(ck, params={"w": np.zeros(2, np.float32)}, step=3)
    args = argparse.Namespace(checkpoint=str(ck), overwrite=False, resume=None)
    with pytest.raises(dg.cli.UsageError, match="already holds a checkpoint"):
        _check_not_another_run(args)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    _check_not_another_run(args)


def test_a_full_disk_at_a_periodic_save_keeps_the_previous_checkpoint(be, tmp_path, capsys, monkeypatch):
    """The save of step 2 fails half-written: its partial files are removed, step 1's checkpoint
    loads, --json says what failed, and the one line says all of it (exit 1)."""
    from duogard.train import load_checkpoint

    _disk_full_after(1)(monkeypatch)
    ck, summary = tmp_path / "ck", tmp_path / "s.json"
    assert (
        _train(be, tmp_path, "--checkpoint", str(ck), "--checkpoint-every", "1", "--json", str(summary)) == 1
    )
    err = capsys.readouterr().err
    assert f"could not write the checkpoint of step 2 in {ck}" in err and "step 1) is intact" in err
    assert sorted(p.name for p in ck.iterdir() if not p.name.startswith(".duogard-lock")) == [
        "checkpoint.json",
        next(p.name for p in ck.iterdir() if p.name.startswith("tensors-00000001-")),
    ]
    assert load_checkpoint(ck).step == 1
    written = json.loads(summary.read_text())
    assert written["completed"] is False and "No space left on device" in written["error"]
    assert written["backend"] == be.name


def test_an_interrupted_rank_says_rank_0_writes_the_checkpoint(tmp_path):
    """Under torchrun every rank stops on Ctrl-C; only rank 0 writes checkpoints."""
    from duogard.cli.train import _interrupted_message
    from duogard.train import save_checkpoint

    ck = tmp_path / "ck"
    args = argparse.Namespace(checkpoint=str(ck))
    assert (
        _interrupted_message(args, 7, rank=1)
        == f"rank 1: interrupted at step 7; rank 0 writes the checkpoint to {ck}"
    )
    save_checkpoint(ck, params={"w": np.zeros(2, np.float32)}, step=7)
    assert _interrupted_message(args, 7, rank=0) == f"interrupted at step 7; checkpoint written to {ck}"
    assert _interrupted_message(args, 7, rank=2).endswith(
        f"rank 0 writes the checkpoint to {ck} (it holds step 7)"
    )
    assert "no new checkpoint" not in _interrupted_message(args, 8, rank=1)
    args.checkpoint = None
    assert _interrupted_message(args, 7, rank=1).endswith("no checkpoint (use --checkpoint DIR)")


@pytest.mark.parametrize("debug", [False, True])
def test_example_scripts_parser_has_debug(debug, capsys, monkeypatch):
    """``duogard.cli.train.main`` (the example scripts' parser) takes --debug; errors name the script."""
    from duogard.cli.train import main as train_main

    _internal(TypeError("boom"))(monkeypatch)
    argv = [*TINY["train"], "--eval-every", "1", *(["--debug"] if debug else [])]
    assert train_main(argv, prog="mnist_mlp.py") == 1
    err = capsys.readouterr().err
    assert "mnist_mlp.py: error: TypeError: boom (run with --debug for the traceback)" in err
    assert ("Traceback (most recent call last)" in err) is debug
