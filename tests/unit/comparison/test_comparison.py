"""The main job as a library function (``duogard.comparison``, issue 25): its name, its outputs,
the command's deprecated old names, and the digits acceptance of issue 7."""

from __future__ import annotations

import json

import pytest

import duogard as dg
from duogard import comparison
from duogard.comparison import compare_methods, format_table, plot_runs, write_outputs
from duogard.methods import DEFAULT_METHODS, parse_method
from duogard.train import build_model


def test_compare_methods_is_the_librarys():
    """``duogard.compare_methods`` is the library function (the command's front calls it)."""
    assert dg.compare_methods is compare_methods
    assert compare_methods.__module__ == "duogard.comparison"
    assert "compare_methods" in dg.__all__ and "comparison" in dg.__all__ and "methods" in dg.__all__
    assert set(comparison.__all__) == {
        "compare_methods", "write_outputs", "format_table", "plot_runs", "plot_pareto",
        "compare_sweep", "write_sweep_outputs", "format_sweep_table", "plot_sweep", "SWEEP_PARAMETERS",
    }  # fmt: skip


OLD_NAMES = {"compare": "compare_methods", **{n: n for n in ("write_outputs", "format_table", "plot_runs")}}


@pytest.mark.parametrize("name, new", OLD_NAMES.items())
def test_the_commands_old_names_are_deprecated_aliases(name, new):
    """``duogard.cli.compare.compare`` and the other functions that module held moved to
    ``duogard.comparison``; the old names still work for one release, with a DeprecationWarning
    naming the new place."""
    import duogard.cli.compare as front

    with pytest.warns(DeprecationWarning, match=rf"duogard\.cli\.compare\.{name} is deprecated.*"
                                                rf"duogard\.comparison\.{new}"):  # fmt: skip
        old = getattr(front, name)
    assert old is getattr(comparison, new)
    assert name not in front.__all__  # `from duogard.cli.compare import *` does not warn
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        front.nope  # noqa: B018


def test_compare_methods_runs_every_backend_and_method_and_writes_its_files(be, digits, tmp_path):
    """Strings and parsed methods alike; the table, the JSON and the plot of the runs."""
    methods = ["backprop:lr=0.1", parse_method("forward:num_tangents=2")]
    out = compare_methods(build_model("mlp", 10, hidden=(8,)), digits, backends=[be.name], methods=methods,
                          steps=3, batch_size=16, diagnostics_every=2, out_dir=tmp_path, progress=False,
                          log=None)  # fmt: skip
    assert [r["method"] for r in out["runs"]] == ["backprop", "forward(num_tangents=2)"]
    assert [r["learning_rate"] for r in out["runs"]] == [0.1, parse_method("forward").learning_rate()]
    assert out["config"]["backends"] == [be.name] and not out["config"]["interrupted"]
    assert out["files"] == [str(tmp_path / f) for f in ("compare.json", "compare.png", "compare-pareto.png")]
    assert json.loads((tmp_path / "compare.json").read_text())["config"]["steps"] == 3
    table = format_table(out["runs"]).splitlines()
    assert table[0].split()[:2] == ["backend", "method"] and len(table) == 4
    assert write_outputs(out, tmp_path / "again", title="t")[1].endswith("compare.png")
    plot_runs(out["runs"], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_compare_methods_names_itself_in_its_errors(digits):
    with pytest.raises(TypeError, match="compare_methods: distributed must be None, True or a DataParallel"):
        compare_methods(build_model("mlp", 10, hidden=(8,)), digits, distributed="yes")
    with pytest.raises(dg.methods.MethodError, match="--methods: .*unknown gradient method 'nope'"):
        compare_methods(build_model("mlp", 10, hidden=(8,)), digits, methods=["nope"], out_dir=None)


# ----------------------------------------------------------------------------- acceptance (issue 7)


@pytest.mark.integration
def test_digits_acceptance_within_the_compare_budget(be):
    """Backprop MLP >= 95% and a forward method >= 90% test accuracy on digits with
    ``duogard compare``'s defaults (80/20 split, seed 0, 2500 steps, hidden 128, the
    methods' own learning rates). Diagnostics are off: they never change the run."""
    backprop = next(m for m in DEFAULT_METHODS if parse_method(m).name == "backprop")
    # the default forward methods with more than one tangent's worth of signal per step
    forward = [
        m
        for m in DEFAULT_METHODS
        if parse_method(m).name == "forward-activity"
        or dict(parse_method(m).options).get("num_tangents", 1) > 1
    ]
    data = dg.data.load("digits", seed=0)
    out = compare_methods(
        build_model("mlp", 10, hidden=(128,)),
        data,
        backends=[be.name],
        methods=[backprop, *forward],
        diagnostics_every=0,
        out_dir=None,
        progress=False,
        log=None,
    )
    acc = {r["method"]: r["test_accuracy"] for r in out["runs"]}
    assert out["config"]["steps"] == 2500
    assert acc.pop(parse_method(backprop).label) >= 0.95, acc
    assert len(acc) == 2 and max(acc.values()) >= 0.90, acc
