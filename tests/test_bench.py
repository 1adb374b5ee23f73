"""Smoke test of the benchmark suite (``duogard_bench``, behind ``duogard bench``): tiny sizes, every
section, the JSON it writes.

Benchmarks are never part of the test suite; this only checks that the machinery runs and
that its records and ratios are what the tables say (the figures themselves are noise here).
"""

from __future__ import annotations

import json
import math

import pytest

import duogard_bench


def test_bench_tiny_runs_every_section_and_its_json_is_consistent(tmp_path):
    """One test, one bench run (about a minute): under pytest-xdist a module fixture would run
    the bench once in every worker that gets one of its tests."""
    pytest.importorskip("jax")
    pytest.importorskip("torch")
    path = tmp_path / "bench.json"
    assert duogard_bench.main(tiny=True, json_path=str(path)) == 0
    result = json.loads(path.read_text())
    for check in (
        _check_machine_and_versions_at_the_top,
        _check_one_step_record_per_configuration,
        _check_ratios_are_the_ratios_of_the_medians,
        _check_other_sections,
        _check_targets_have_figure_limit_status_and_why,
    ):
        check(result)


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_machine_and_versions_at_the_top(result):
    m = result["machine"]
    assert m["cores"] >= 1 and m["cpu"]
    assert m["jax"] and m["torch"] and m["duogard"]
    assert m["command"].startswith("duogard bench --tiny")
    assert result["mode"] == "tiny"


def _check_one_step_record_per_configuration(result):
    sz = duogard_bench.sizes_for(tiny=True)
    recs = {(r["backend"], r["model"], r["method"], r["impl"]): r for r in result["step_time"]}
    for model, methods in sz.methods.items():
        for method in methods:
            for backend in ("jax", "torch"):
                for impl in ("duogard", "hand"):
                    r = recs[(backend, model, method, impl)]
                    assert "error" not in r, r
                    assert _finite_positive(r["median_s"]) and r["samples"] >= sz.rounds
                    assert _finite_positive(r["first_step_s"])
            assert ("torch", model, "backprop", "hand-autograd") in recs
    # the hand-written steps compute duogard's loss (same params, same batch)
    for r in result["step_time"]:
        if r["impl"] != "duogard":
            assert r["same_first_loss"] is True, r
    assert recs[("torch", "mlp", "fwd-K4-normal", "hand-jvp")]["same_first_loss"] is True


def _check_ratios_are_the_ratios_of_the_medians(result):
    recs = {(r["backend"], r["model"], r["method"], r["impl"]): r for r in result["step_time"]}
    for (b, m, me, im), r in recs.items():
        t = r["median_s"]
        ratios = r["ratios"]
        if im == "duogard":
            assert ratios["duogard_over_hand"] == pytest.approx(t / recs[(b, m, me, "hand")]["median_s"])
        if me != "backprop" and im in ("duogard", "hand"):
            bp = recs[(b, m, "backprop", im)]["median_s"]
            assert ratios["forward_over_backprop"] == pytest.approx(t / bp)
        if im in ("duogard", "hand"):
            jt = recs[("jax", m, me, im)]["median_s"] / recs[("torch", m, me, im)]["median_s"]
            assert ratios["jax_over_torch"] == pytest.approx(jt)
        if me.startswith("fwd-") and im == "duogard":
            assert ratios["tangent_share"] == pytest.approx(r["draw_median_s"] / t)
            assert _finite_positive(r["draw_median_s"])


def _check_other_sections(result):
    assert {d["backend"] for d in result["draw_options"]} == {"jax", "torch"}
    assert all(_finite_positive(d["ns_per_element"]) for d in result["draw_options"])
    mem = result["memory"]
    assert sorted(r["depth"] for r in mem) == [2, 4]
    for r in mem:
        assert "error" not in r, r
        assert r["params_mb"] > 0 and math.isfinite(r["peak_beyond_params_mb"])
    conv = [r for r in result["conversion"] if "error" not in r]
    assert {(r["direction"], r["impl"]) for r in conv} >= {("torch->jax", "bare"), ("jax->torch", "bare")}
    for r in conv:
        assert _finite_positive(r["median_s"]) and r["zero_copy"] is True
    assert {(c["backend"], c["model"]) for c in result["compile"]} == {
        (b, m) for b in ("jax", "torch") for m in ("mlp", "cnn")
    }


def _check_targets_have_figure_limit_status_and_why(result):
    targets = result["targets"]
    names = {t["target"].split(" (")[0].split(",")[0] for t in targets}
    assert {
        "forward step / backprop step",
        "duogard step / hand-written step",
        "tangent drawing / forward step",
        "forward peak memory",
    } <= {n.split(" at ")[0] for n in names}
    assert any(t["target"].startswith("conversion") for t in targets)
    for t in targets:
        assert t["status"] == ("PASS" if t["measured"] <= t["limit"] else "MISS")
        if t["status"] == "MISS":
            assert t["why"]
