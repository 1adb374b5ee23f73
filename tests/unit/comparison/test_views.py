"""The main job at equal memory (issue 27, item 3): the rivals' rows, the time to a target
accuracy, the Pareto figure and the depth / batch-size sweep. Tiny models, a few steps."""

from __future__ import annotations

import json

import pytest

from duogard.comparison import (
    compare_methods,
    compare_sweep,
    format_sweep_table,
    format_table,
    plot_pareto,
    write_outputs,
)
from duogard.comparison._views import _frontier, _label_groups
from duogard.train import build_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUIET = dict(out_dir=None, progress=False, log=None, diagnostics_every=0)


def _mlp(depth: int = 1, width: int = 16):
    return build_model("mlp", 10, hidden=(width,) * depth)


# ----------------------------------------------------------------------------- the rivals' rows


def test_spsa_and_checkpointed_backprop_run_with_their_step_memory(be, digits):
    """The zeroth-order and checkpointed rows: each runs, and its row in the JSON and the table
    carries its step memory (the lean SPSA row, whose JAX step compiles a program a layer, is
    tested through ``duogard compare --methods`` in tests/integration)."""
    methods = ["spsa:num_queries=2", "backprop:checkpoint=true"]
    out = compare_methods(_mlp(2), digits, backends=[be.name], methods=methods, steps=4, batch_size=16,
                          **QUIET)  # fmt: skip
    labels = ["spsa(num_queries=2)", "backprop(checkpoint=True)"]
    assert [r["method"] for r in out["runs"]] == labels
    for r in out["runs"]:
        assert r["steps"] == 4 and r["step_memory_bytes"] > 0, r
    lines = format_table(out["runs"]).splitlines()
    col = lines[0].index("step MB")
    for label, line in zip(labels, lines[2:]):
        assert label in line and float(line[col : col + 7]) >= 0.0


# ----------------------------------------------------------------------------- time to a target


def test_time_to_target_is_the_first_evaluation_at_or_above_it(be, digits):
    out = compare_methods(_mlp(), digits, backends=[be.name], methods=["backprop:lr=0.2"], steps=30,
                          batch_size=32, eval_every=3, target_accuracy=0.5, **QUIET)  # fmt: skip
    assert out["config"]["target_accuracy"] == 0.5 and out["config"]["eval_every"] == 3
    r = out["runs"][0]
    evals = r["evals"]
    assert [e["step"] for e in evals] == list(range(3, 31, 3))
    first = next(e for e in evals if e["test_accuracy"] >= 0.5)  # backprop gets there in 30 steps
    assert r["target_accuracy"] == 0.5 and r["steps_to_target"] == first["step"]
    assert r["seconds_to_target"] == pytest.approx(first["train_seconds"], rel=1e-12)
    # one clock, the timed steps': rising through the evaluations, within the run's wall-clock
    clock = [e["train_seconds"] for e in evals]
    assert clock == sorted(clock) and clock[-1] == pytest.approx(r["train_seconds"], rel=1e-12)
    assert 0 < r["train_seconds"] < r["total_seconds"]
    head, _, row = format_table(out["runs"]).splitlines()
    assert head.split()[-6:] == ["steps", "to", "0.5", "s", "to", "0.5"]
    assert row.split()[-2:] == [str(first["step"]), f"{r['seconds_to_target']:.2f}"]


def test_a_target_never_reached_says_never_and_none_means_no_target(be, digits, tmp_path):
    kw = dict(backends=[be.name], methods=["backprop"], steps=3, batch_size=16, progress=False, log=None)
    out = compare_methods(_mlp(), digits, target_accuracy=1.0, out_dir=tmp_path, **kw)
    r = out["runs"][0]
    assert r["steps_to_target"] is None and r["seconds_to_target"] is None
    assert out["config"]["eval_every"] == 1  # a hundredth of 3 steps, at least 1
    assert format_table(out["runs"]).splitlines()[2].split()[-2:] == ["never", "-"]
    saved = json.loads((tmp_path / "compare.json").read_text())["runs"][0]
    assert saved["steps_to_target"] is None and saved["target_accuracy"] == 1.0
    none = compare_methods(_mlp(), digits, target_accuracy=None, out_dir=None, **kw)
    assert "steps_to_target" not in none["runs"][0] and none["config"]["target_accuracy"] is None
    assert "to" not in format_table(none["runs"]).splitlines()[0].split()


def test_a_bad_target_is_refused(digits):
    with pytest.raises(ValueError, match="TimeToTarget: target must be an accuracy"):
        compare_methods(_mlp(), digits, methods=["backprop"], steps=1, target_accuracy=90, **QUIET)


# ----------------------------------------------------------------------------- the Pareto view


def test_the_pareto_figure_is_written(be, digits, tmp_path):
    methods = ["backprop", "forward"]
    out = compare_methods(_mlp(), digits, backends=[be.name], methods=methods, steps=3, batch_size=16,
                          out_dir=tmp_path, progress=False, log=None, diagnostics_every=0)  # fmt: skip
    assert str(tmp_path / "compare-pareto.png") in out["files"]
    assert (tmp_path / "compare-pareto.png").read_bytes()[:8] == PNG_MAGIC
    # results written before the training clock (no train_seconds) still plot, on wall-clock
    old = [{k: v for k, v in r.items() if k != "train_seconds"} for r in out["runs"]]
    plot_pareto(old, tmp_path / "old.png")
    assert (tmp_path / "old.png").read_bytes()[:8] == PNG_MAGIC
    assert write_outputs(out, tmp_path / "again")[2].endswith("compare-pareto.png")


def test_the_frontier_keeps_the_runs_no_other_beats():
    pts = [(3.0, 0.9), (1.0, 0.5), (2.0, 0.95), (2.5, 0.6), (1.0, 0.7), (4.0, 0.95)]
    assert _frontier(pts) == [(1.0, 0.7), (2.0, 0.95)]
    assert _frontier([]) == []


def test_labels_of_points_that_coincide_are_printed_once_together():
    pts = [(1.0, 0.9), (1.001, 0.9), (2.0, 0.5)]
    assert _label_groups(pts, ["1", "2", "3"]) == [((1.0, 0.9), "1,2"), ((2.0, 0.5), "3")]
    assert _label_groups([], []) == []


# ----------------------------------------------------------------------------- the sweep


def test_a_depth_sweep_has_one_entry_per_value_and_backprops_memory_rises(be, digits, tmp_path):
    """Backprop keeps every layer's activations, so its step memory rises with depth (the lean
    rows' flat lines are checked through the command, in tests/integration)."""
    out = compare_sweep(lambda d: _mlp(d, width=32), digits, parameter="depth", values=[1, 2, 4],
                        backends=[be.name], methods=["backprop", "forward"], steps=2, batch_size=64,
                        out_dir=tmp_path, progress=False, log=None, diagnostics_every=0)  # fmt: skip
    assert out["config"] == {"parameter": "depth", "values": [1, 2, 4], "interrupted": False}
    assert [p["value"] for p in out["points"]] == [1, 2, 4]
    mem = {}
    for p in out["points"]:
        assert [r["method"] for r in p["runs"]] == ["backprop", "forward"]
        assert all("history" not in r and r["evals"] for r in p["runs"])
        for r in p["runs"]:
            mem.setdefault(r["method"], []).append(r["step_memory_bytes"])
    assert mem["backprop"][0] < mem["backprop"][1] < mem["backprop"][2], mem
    assert out["files"] == [str(tmp_path / "compare-sweep.json"), str(tmp_path / "compare-sweep.png")]
    assert (tmp_path / "compare-sweep.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((tmp_path / "compare-sweep.json").read_text())["config"]["values"] == [1, 2, 4]
    table = format_sweep_table(out).splitlines()
    assert table[0] == "step memory, MiB, against depth"
    assert table[1].split() == ["backend", "method", "depth=1", "depth=2", "depth=4", "last/first"]
    ratio = float(table[3].split()[-1].rstrip("x"))
    assert table[3].split()[:2] == [be.name, "backprop"]
    assert ratio == pytest.approx(mem["backprop"][2] / mem["backprop"][0], abs=0.01)


def test_a_batch_sweep_runs_each_batch_size_on_one_model(be, digits):
    out = compare_sweep(_mlp(), digits, parameter="batch_size", values=[16, 128], backends=[be.name],
                        methods=["backprop"], steps=2, **QUIET)  # fmt: skip
    assert [p["config"]["batch_size"] for p in out["points"]] == [16, 128]
    m16, m128 = (p["runs"][0]["step_memory_bytes"] for p in out["points"])
    assert m128 > m16


class _StopAfterFirstRun:
    """An interrupt whose stop is requested at the last step of the first run."""

    requested = False

    def callback(self):
        def stop(record):
            self.requested = self.requested or record["step"] == 2

        return stop


def test_an_interrupted_sweep_keeps_the_values_so_far(be, digits):
    out = compare_sweep(lambda d: _mlp(d), digits, parameter="depth", values=[1, 2], backends=[be.name],
                        methods=["backprop"], steps=2, interrupt=_StopAfterFirstRun(), **QUIET)  # fmt: skip
    assert [p["value"] for p in out["points"]] == [1] and out["config"]["interrupted"]


@pytest.mark.parametrize(
    "model, kw, error, match",
    [
        (_mlp(), dict(parameter="depth", values=[1, 2]), TypeError, "a depth sweep needs model=a function"),
        (_mlp, dict(parameter="width", values=[1]), ValueError, "parameter must be one of"),
        (_mlp, dict(parameter="depth", values=[]), ValueError, "distinct positive ints"),
        (_mlp, dict(parameter="depth", values=[2, 2]), ValueError, "distinct positive ints"),
        (_mlp, dict(parameter="depth", values=[0]), ValueError, "distinct positive ints"),
        (_mlp, dict(parameter="depth", values=[1.5]), ValueError, "distinct positive ints"),
        (_mlp(), dict(parameter="batch_size", values=[8], batch_size=8), TypeError, "batch_size is the"),
    ],
)
def test_bad_sweeps_are_refused_before_any_run(digits, model, kw, error, match):
    with pytest.raises(error, match=f"compare_sweep: .*{match}"):
        compare_sweep(model, digits, **kw, **QUIET)
