"""``duogard compare`` at equal memory (issue 27, item 3): the rivals' rows from ``--methods``,
``--target-accuracy`` and ``--eval-every``, the Pareto figure, ``--sweep``, and their usage errors."""

from __future__ import annotations

import json

import pytest

from duogard.cli import main

from helpers import AVAILABLE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(argv) -> int:
    try:
        return main(list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def test_compare_runs_spsa_and_checkpointed_backprop_with_their_step_memory(capsys, tmp_path):
    """The rivals' rows through ``--methods`` on every installed backend: each run's JSON and
    table row carry its step memory and its time to the target; the Pareto figure is written."""
    out = tmp_path / "cmp"
    methods = "spsa:num_queries=2;spsa:lean=true;backprop:checkpoint=true"
    argv = ["compare", "--methods", methods, "--steps", "20", "--hidden", "16", "--target-accuracy", "0.2",
            "--eval-every", "5", "--diagnostics-every", "0", "--out", str(out), "--quiet"]  # fmt: skip
    assert run(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "compare.json").read_text())
    labels = ["spsa(num_queries=2)", "spsa(lean=True)", "backprop(checkpoint=True)"]
    assert sorted((r["backend"], r["method"]) for r in result["runs"]) == sorted(
        (b, m) for b in AVAILABLE for m in labels
    )
    for r in result["runs"]:
        assert r["step_memory_bytes"] > 0 and r["steps"] == 20
        assert [e["step"] for e in r["evals"]] == [5, 10, 15, 20]
        reached = [e for e in r["evals"] if e["test_accuracy"] >= 0.2]
        assert r["steps_to_target"] == (reached[0]["step"] if reached else None)
    assert result["config"]["target_accuracy"] == 0.2 and result["config"]["eval_every"] == 5
    head = next(line for line in printed.splitlines() if line.startswith("backend"))
    assert "step MB" in head and head.split()[-6:] == ["steps", "to", "0.2", "s", "to", "0.2"]
    for label in labels:
        assert sum(label in line for line in printed.splitlines()) >= len(AVAILABLE)
    assert (out / "compare-pareto.png").read_bytes()[:8] == PNG_MAGIC
    assert f"wrote {out / 'compare-pareto.png'}" in printed


def test_no_target_means_no_target_columns(capsys, tmp_path):
    be = AVAILABLE[-1]
    argv = ["compare", "--backends", be, "--methods", "backprop", "--steps", "3", "--hidden", "8",
            "--target-accuracy", "none", "--out", str(tmp_path), "--quiet"]  # fmt: skip
    assert run(argv) == 0
    head = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("backend"))
    assert "to" not in head.split()
    run0 = json.loads((tmp_path / "compare.json").read_text())["runs"][0]
    assert "steps_to_target" not in run0 and run0["evals"]


def test_a_depth_sweep_prints_and_plots_step_memory_against_depth(capsys, tmp_path):
    """One entry per depth; backprop's step memory rises with depth, lean SPSA's stays flat."""
    be = AVAILABLE[-1]
    argv = ["compare", "--backends", be, "--methods", "backprop;spsa:lean=true", "--sweep", "depth=1,4",
            "--hidden", "32", "--steps", "2", "--diagnostics-every", "0", "--out", str(tmp_path),
            "--quiet"]  # fmt: skip
    assert run(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "compare-sweep.json").read_text())
    assert result["config"] == {"parameter": "depth", "values": [1, 4], "interrupted": False}
    assert [p["value"] for p in result["points"]] == [1, 4]
    mem = {}
    for p in result["points"]:
        for r in p["runs"]:
            mem.setdefault(r["method"], []).append(r["step_memory_bytes"])
    assert mem["backprop"][1] > 1.5 * mem["backprop"][0], mem
    assert mem["spsa(lean=True)"][1] < 1.3 * mem["spsa(lean=True)"][0], mem
    assert (tmp_path / "compare-sweep.png").read_bytes()[:8] == PNG_MAGIC
    assert "depth = 1" in printed and "depth = 4" in printed
    assert "step memory, MiB, against depth" in printed
    assert f"wrote {tmp_path / 'compare-sweep.png'}" in printed
    assert not (tmp_path / "compare.json").exists()


def test_a_batch_sweep_runs_each_batch_size(capsys, tmp_path):
    be = AVAILABLE[-1]
    argv = ["compare", "--backends", be, "--methods", "backprop", "--sweep", "batch=16,64", "--hidden", "8",
            "--steps", "2", "--out", str(tmp_path), "--quiet"]  # fmt: skip
    assert run(argv) == 0
    result = json.loads((tmp_path / "compare-sweep.json").read_text())
    assert result["config"]["parameter"] == "batch_size"
    assert [p["config"]["batch_size"] for p in result["points"]] == [16, 64]
    assert "step memory, MiB, against batch_size" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target-accuracy", "90"], "--target-accuracy must be an accuracy in (0, 1] or none, got '90'"),
        (["--target-accuracy", "high"], "--target-accuracy must be an accuracy in (0, 1] or none"),
        (["--eval-every", "0"], "--eval-every must be a positive int, got 0"),
        (["--sweep", "width=2,4"], "--sweep must be depth=N,N,... or batch=N,N,..."),
        (["--sweep", "depth"], "--sweep must be depth=N,N,..."),
        (["--sweep", "depth=2,2"], "(distinct positive ints), got 'depth=2,2'"),
        (["--sweep", "depth=0,2"], "--sweep must be depth=N,N,..."),
        (["--sweep", "depth=2,x"], "--sweep must be depth=N,N,..."),
        (["--sweep", "depth=2,4", "--model", "cnn"], "--sweep depth needs --model mlp or local-mlp"),
        (["--sweep", "depth=2,4", "--hidden", "16,32"], "--sweep depth repeats one hidden width"),
        (
            ["--sweep", "depth=2", "--model", "local-mlp", "--hidden", "12", "--groups", "8"],
            "--groups 8 must divide",
        ),
        (["--sweep", "batch=16,100000"], "--sweep batch=100000 is larger than the training set"),
    ],
)
def test_usage_errors_exit_2_before_any_run(capsys, tmp_path, argv, message):
    assert run(["compare", *argv, "--steps", "1", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if "--groups" not in message and "training set" not in message:  # those need the data first
        assert not (tmp_path / "o").exists()
