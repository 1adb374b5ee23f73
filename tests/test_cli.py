"""The ``duogard`` command: help everywhere, exit code 2 on usage errors, and tiny real runs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from duogard.cli import DEFAULT_METHODS, main

from conftest import AVAILABLE

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
        ([], ["train", "compare", "bench", "parity"]),
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
    assert (out / "compare.png").read_bytes()[:8] == PNG_MAGIC

    lines = printed.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("backend"))
    for col in ("method", "final loss", "test acc", "ms/step", "total s", "peak MB", "cosine"):
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
