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
        _check_rank1_rows,
        _check_targets_have_figure_limit_status_and_why,
    ):
        check(result)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_hand_written_rank1_jvp_is_the_jvp_along_u_w_and_duogards(backend):
    """The hand-written rank-1 forward pass (factors carried through Linear and Conv2d) gives the
    framework's JVP along the dense tangents u ⊗ w, and duogard's estimate from the same factors
    (``Forward.estimate_tree`` with :class:`duogard.tree.Rank1` leaves) is the one those JVPs give."""
    pytest.importorskip(backend)
    import numpy as np

    import duogard as dg
    from duogard import optim
    from duogard.train import Trainer
    from duogard.tree import Rank1

    jit = __import__("jax").jit if backend == "jax" else (lambda f: f)  # eager JAX dispatches op by op
    sz = duogard_bench.sizes_for(tiny=True)
    x_np, y_np = duogard_bench.data_for(sz)
    be = dg.backend(backend)
    x, y = be.asarray(x_np), be.asarray(y_np.astype(np.int32) if backend == "jax" else y_np)
    rng = np.random.default_rng(0)
    for model_name in ("mlp", "cnn"):
        wl = duogard_bench.workload(model_name, sz, x_np)
        names = sorted(wl.params_np, key=int)
        for k in (1, 3):
            est = dg.estimator("forward", tangents="rank1", num_tangents=k)
            tr = Trainer(wl.model, optimizer=optim.sgd(0.0), estimator=est, backend=backend)
            params, _ = tr.init_state(wl.params_np)
            layers = [params[n] for n in names]
            # the factors, drawn here (duogard's own draw would compile its key arithmetic on JAX)
            factors_np = [
                {
                    leaf: (
                        rng.standard_normal((k, a.shape[0]), dtype=np.float32),
                        rng.standard_normal((k, *a.shape[1:]), dtype=np.float32),
                    )
                    if a.ndim >= 2
                    else rng.standard_normal((k, *a.shape), dtype=np.float32)
                    for leaf, a in wl.params_np[n].items()
                }
                for n in names
            ]
            asarray = lambda t: tuple(be.asarray(a) for a in t) if isinstance(t, tuple) else be.asarray(t)  # noqa: E731
            tangents = [{leaf: asarray(t) for leaf, t in tl.items()} for tl in factors_np]
            dense_np = [
                {
                    leaf: (t[0][:, :, None] * t[1].reshape(k, 1, -1)).reshape(k, *wl.params_np[n][leaf].shape)
                    if isinstance(t, tuple)
                    else t
                    for leaf, t in tl.items()
                }
                for n, tl in zip(names, factors_np)
            ]
            dense = [{leaf: be.asarray(t) for leaf, t in tl.items()} for tl in dense_np]
            value, d = jit(lambda ls, ts, k=k: _hand_rank1_jvp(backend, wl.ops, ls, ts, x, y, k))(
                layers, tangents
            )
            ref_value, ref_d = _framework_jvps(backend, jit, wl.ops, layers, dense, x, y, k)
            np.testing.assert_allclose(be.to_numpy(d), ref_d, rtol=2e-4, atol=1e-5)
            assert float(value) == pytest.approx(ref_value, rel=1e-5)
            # duogard: its estimate from the same factors is sum_k d_k v_k / K
            vtree = {
                n: {leaf: Rank1(*t) if isinstance(t, tuple) else t for leaf, t in tl.items()}
                for n, tl in zip(names, tangents)
            }
            loss, g = est.estimate_tree(tr.loss_fn, params, (x, y), vtree)
            assert float(loss) == pytest.approx(ref_value, rel=1e-5)
            for n, tl in zip(names, dense_np):
                for leaf, t in tl.items():
                    ref_g = np.tensordot(np.asarray(ref_d, dtype=np.float32), t, axes=1) / k
                    np.testing.assert_allclose(be.to_numpy(g[n][leaf]), ref_g, rtol=1e-3, atol=1e-6)


def _hand_rank1_jvp(backend, ops, layers, tangents, x, y, k):
    if backend == "torch":
        import torch

        with torch.no_grad():
            return duogard_bench.manual_jvp(ops, layers, tangents, x, y, k)
    return duogard_bench.jax_rank1_jvp(ops, layers, tangents, x, y, k)


def _framework_jvps(backend, jit, ops, layers, dense, x, y, k):
    """The loss and its K directional derivatives by the framework's own jvp, tangent by tangent."""
    if backend == "torch":
        import torch
        import torch.nn.functional as F

        def loss(*flat):
            rebuilt = [{"weight": flat[2 * i], "bias": flat[2 * i + 1]} for i in range(len(flat) // 2)]
            return F.cross_entropy(duogard_bench.torch_apply(ops, rebuilt, x), y)

        leaves, tleaves = duogard_bench.torch_leaves(layers), duogard_bench.torch_leaves(dense)
        out = [torch.func.jvp(loss, tuple(leaves), tuple(t[i] for t in tleaves)) for i in range(k)]
    else:
        import jax
        import jax.numpy as jnp

        def loss(p):
            return jnp.mean(duogard_bench.jax_per_example(duogard_bench.jax_apply(ops, p, x), y))

        one = jit(lambda i, p, t: jax.jvp(loss, (p,), (jax.tree.map(lambda a: a[i], t),)))
        out = [one(i, layers, dense) for i in range(k)]
    return float(out[0][0]), [float(d) for _, d in out]


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


def _check_rank1_rows(result):
    """The rank-1 rows ran (duogard, its lean step, the hand-written step), their losses are
    duogard's, and the rank-1 / dense ratio is that of the medians."""
    recs = {(r["backend"], r["model"], r["method"], r["impl"]): r for r in result["step_time"]}
    sz = duogard_bench.sizes_for(tiny=True)
    rank1 = [
        (m, me) for m, methods in sz.methods.items() for me in methods if me in duogard_bench.RANK1_METHODS
    ]
    assert rank1
    for b in ("jax", "torch"):
        for m, me in rank1:
            for im in ("duogard", "hand") + (("duogard-lean",) if me in sz.lean_methods else ()):
                r = recs[(b, m, me, im)]
                assert "error" not in r, r
                assert _finite_positive(r["median_s"])
                if im != "duogard":
                    assert r["same_first_loss"] is True, r
            twin = me.removesuffix("-rank1")
            if (b, m, twin, "duogard") in recs:
                r = recs[(b, m, me, "duogard")]
                assert r["ratios"]["rank1_over_dense"] == pytest.approx(
                    r["median_s"] / recs[(b, m, twin, "duogard")]["median_s"]
                )
    gens = {(g["backend"], g["distribution"], g["elements"]): g for g in result["draw_generators"]}
    n = result["draw_options"][0]["elements"]
    assert set(gens) == {
        (b, d, e) for b in ("jax", "torch") for d in ("normal", "rademacher") for e in (n, 1024)
    }
    for g in gens.values():
        assert g["portable_over_native"] == pytest.approx(g["portable_ns"] / g["native_ns"])


def _check_other_sections(result):
    assert {d["backend"] for d in result["draw_options"]} == {"jax", "torch"}
    assert all(_finite_positive(d["ns_per_element"]) for d in result["draw_options"])
    mem = result["memory"]
    assert sorted(r["depth"] for r in mem) == [2, 4]
    for r in mem:
        assert "error" not in r, r
        assert r["params_mb"] > 0 and math.isfinite(r["peak_beyond_params_mb"])
        # the step's own memory, as fit reports it: at least one batch of hidden activations
        assert r["step_memory_mb"] * 2**20 >= r["batch"] * r["width"] * 4, r
    conv = [r for r in result["conversion"] if "error" not in r]
    assert {(r["direction"], r["impl"]) for r in conv} >= {("torch->jax", "bare"), ("jax->torch", "bare")}
    for r in conv:
        assert _finite_positive(r["median_s"]) and r["zero_copy"] is True
    assert {(c["backend"], c["model"]) for c in result["compile"]} == {
        (b, m) for b in ("jax", "torch") for m in ("mlp", "cnn")
    }
    # data-parallel: one torchrun launch of 2 ranks; forward sends K + 1 = 5 numbers, backprop P + 1
    (launch,) = result["distributed"]
    assert "error" not in launch, launch.get("error")
    assert (launch["backend"], launch["procs"]) == ("torch", 2)
    assert {(r["model"], r["method"]) for r in launch["rows"]} == {
        (m, g) for m in ("mlp", "cnn") for g in ("backprop", "forward")
    }
    for r in launch["rows"]:
        assert r["numbers_per_step"] == (5 if r["method"] == "forward" else r["params"] + 1), r
        assert _finite_positive(r["step_ms"])
    assert launch["latency_s"] >= 0 and launch["s_per_number"] >= 0


def _check_targets_have_figure_limit_status_and_why(result):
    targets = result["targets"]
    names = {t["target"].split(" (")[0].split(",")[0] for t in targets}
    assert {
        "forward step / backprop step",
        "duogard step / hand-written step",
        "tangent drawing / forward step",
        "forward step memory",
        "rank-1 forward step / backprop step",
    } <= {n.split(" at ")[0] for n in names}
    assert any(t["target"].startswith("conversion") for t in targets)
    for t in targets:
        assert t["status"] == ("PASS" if t["measured"] <= t["limit"] else "MISS")
        if t["status"] == "MISS":
            assert t["why"]


def test_main_job_bench_times_compares_methods_beside_hand_written_steps(tmp_path):
    """benchmarks/main_job.py: every compare default method on both backends, duogard beside the
    hand-written step; the ratios are computed from the timings, and the targets' verdicts follow
    the limits."""
    from helpers import ROOT, load_script

    mod = load_script(ROOT / "benchmarks" / "main_job.py", "main_job_bench")
    t = mod.measure(("jax", "torch"), rounds=1, reps=2)
    assert len(t) == 3 * 2 * len(mod.MAIN_JOB_METHODS) and all(v > 0 for v in t.values())
    recs = mod.rows(t)
    back = recs[0]
    assert back["torch_over_hand"] == t[("torch", "backprop", "duogard")] / t[("torch", "backprop", "hand")]
    assert back["ratio_of_ratios"] == back["torch_over_jax"] / back["torch_over_jax_hand"]
    # the verdicts follow the limits, on made-up figures
    fake = {k: 1.0 for k in t}
    fake[("torch", "backprop", "duogard")] = 1.3
    text = mod.report(mod.rows(fake))
    assert "MISS  torch backprop" in text and "PASS  jax   backprop" in text
    assert "MISS  torch/JAX backprop" in text and "PASS  torch/JAX forward " in text


def test_attention_jvp_bench_tiny_measures_linear_memory(tmp_path):
    """benchmarks/attention_jvp.py --tiny: both backends, two lengths; the blockwise JVP's memory
    doubles with the length (one block of scores), the math form's grows faster; the JSON holds
    every row."""
    from helpers import ROOT, load_script

    mod = load_script(ROOT / "benchmarks" / "attention_jvp.py", "attention_jvp_bench")
    path = tmp_path / "attention.json"
    assert mod.main(["--tiny", "--lengths", "128,256", "--json", str(path)]) == 0
    rows = {(r["backend"], r["length"]): r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {(b, n) for b in ("jax", "torch") for n in (128, 256)}
    for backend in ("jax", "torch"):
        short, long = rows[backend, 128], rows[backend, 256]
        assert 1.5 < long["jvp-bytes"] / short["jvp-bytes"] < 2.5, backend
        assert long["math-jvp-bytes"] / short["math-jvp-bytes"] > 3, backend
        assert all(long[k] > 0 for k in ("fwd-ms", "jvp-ms", "native-fwd-ms", "jvp/fwd")), backend
