"""The ``duogard`` command's bad inputs, one table: each row's exit code and the flag its message names.

Exit 2 (a usage error) comes before any work: nothing is printed on stdout, no traceback. Exit 1
is a run that failed (an output that could not be written at the end, an error inside duogard:
one line with the ``--debug`` hint). ``{tmp}`` in an argument is the test's temporary directory,
``{file}`` a file in it and ``{ro}`` a read-only directory in it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import duogard as dg
from duogard.cli import main

from conftest import AVAILABLE

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
    mp.setattr("duogard.cli.compare.plot_runs", _raise(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))


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
    if "could not write" in needle:
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
    assert f"--resume {ck}: load_checkpoint:" in err and "does not match" in err
    assert "Traceback" not in err


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
