"""examples/fwdgrad: fwdgrad's experiments with its settings, on both backends.

The Hydra configs resolve to fwdgrad's numbers; a few steps of each experiment run on JAX and
on PyTorch (in process, through Hydra's compose API) and agree where they should (the same
weights, batches and tangents); the TensorBoard event files, read back with TensorBoard's own
``EventAccumulator``, hold the expected tags and steps, as do the CSV and JSONL copies.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import AVAILABLE, ROOT, load_script

hydra = pytest.importorskip("hydra", reason="the fwdgrad examples need hydra-core (the examples extra)")
pytest.importorskip("tensorboardX", reason="the fwdgrad examples need tensorboardX (the examples extra)")
torch = pytest.importorskip("torch", reason="fwdgrad's models are torch modules")

from hydra import compose, initialize_config_dir  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

HERE = ROOT / "examples" / "fwdgrad"
CONFIGS = str(HERE / "configs")
needs_both = pytest.mark.skipif(len(AVAILABLE) < 2, reason="needs jax and torch")
MNIST_TAGS = {"Loss/train_loss", "Misc/lr", "Time/batch_time", "Time/sps", "Test/accuracy"}
SMALL_MLP = ["model.hidden_sizes=[16]", "dataset.max_test=64", "threads=1"]


def _script(name):
    """A script of examples/fwdgrad, imported by its path (it puts its folder on sys.path, where
    the configs' ``_target_: fwdgrad_models....`` is found)."""
    return load_script(HERE / f"{name}.py", f"fwdgrad_example_{name}")


@pytest.fixture(scope="module")
def ex():
    """The example modules: mnist, global_optimization and their fwdgrad_common."""
    mods = {n: _script(n) for n in ("mnist", "global_optimization")}
    return {**mods, "fwdgrad_common": importlib.import_module("fwdgrad_common")}


def _cfg(name, overrides, tmp_path):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(name, overrides=[*overrides, f"logdir={tmp_path}"])


def _events(folder):
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _rows(folder):
    with open(Path(folder) / "scalars.csv", newline="") as f:
        from_csv = [(r["tag"], int(r["step"]), float(r["value"])) for r in csv.DictReader(f)]
    lines = (Path(folder) / "scalars.jsonl").read_text().splitlines()
    from_jsonl = [(d["tag"], d["step"], d["value"]) for d in map(json.loads, lines)]
    return from_csv, from_jsonl


# ----------------------------------------------------------------------------- the configs


def test_configs_resolve_to_fwdgrads_numbers(ex, tmp_path):
    cfg = _cfg("config", [], tmp_path)
    opt, ds = cfg.optimization, cfg.dataset
    assert (opt.optimizer, opt.learning_rate, opt.k, opt.momentum, opt.nesterov) == (
        "sgd",
        2e-4,
        1e-4,
        0.0,
        False,
    )
    assert (opt.weight_decay, opt.grad_clipping, opt.epochs) == (0.0, 0.0, 200)
    assert (ds.batch_size, ds.shuffle, ds.drop_last, ds.mean, ds.std, ds.path) == (
        64,
        True,
        False,
        0.1307,
        0.3081,
        None,
    )
    assert (cfg.grad, cfg.backend, cfg.steps) == ("forward", None, None)
    models = {}
    for name in ("default", "logreg", "conv"):
        mcfg = _cfg("config", [f"model={name}"], tmp_path).model
        in_size = 1 if name == "conv" else 784
        models[name] = hydra.utils.instantiate(mcfg, input_size=in_size, output_size=10)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    assert counts == {"default": 1_863_690, "logreg": 7_850, "conv": 3_333_962}
    assert [m.out_channels for m in (models["conv"].conv1, models["conv"].conv4)] == [64, 64]
    assert models["conv"].fc1.in_features == 3136 and isinstance(models["default"].act0, torch.nn.ReLU)
    assert _cfg("config", ["optimization=adam"], tmp_path).optimization.eps == 1e-4
    g = _cfg("global_optim", [], tmp_path)
    assert (g.learning_rate, g.iterations, g.seed, g.function._target_) == (
        1e-2,
        1000,
        42,
        "duogard.data.beale",
    )
    torch.manual_seed(42)
    assert list(g.start) == torch.rand(2).tolist()  # fwdgrad's start, written out for JAX-only installs


# ----------------------------------------------------------------------------- MNIST


@needs_both
@pytest.mark.parametrize(
    "grad,model,lr", [("backprop", "model=logreg", 0.005), ("forward", "model.hidden_sizes=[16]", 2e-3)]
)
def test_mnist_same_run_on_both_backends(ex, tmp_path, grad, model, lr):
    """Same weights, batches and tangents: both backends give the same losses (float32 rounding)."""
    over = [
        model,
        "dataset.max_test=64",
        "threads=1",
        f"grad={grad}",
        f"optimization.learning_rate={lr}",
        "steps=4",
    ]
    res = {
        b: ex["mnist"].train(_cfg("config", [*over, f"backend={b}"], tmp_path / b)) for b in ("torch", "jax")
    }
    np.testing.assert_allclose(res["jax"]["losses"], res["torch"]["losses"], rtol=1e-4)
    assert abs(res["jax"]["test_accuracy"] - res["torch"]["test_accuracy"]) <= 1 / 64
    assert all(math.isfinite(v) for v in res["torch"]["losses"]) and res["torch"]["steps"] == 4
    if grad == "backprop":
        assert res["torch"]["losses"][-1] < res["torch"]["losses"][0]
    for b, r in res.items():
        ev = _events(r["logdir"])
        assert set(ev) == MNIST_TAGS, b
        assert [s for s, _ in ev["Loss/train_loss"]] == [1, 2, 3, 4]
        np.testing.assert_allclose([v for _, v in ev["Loss/train_loss"]], r["losses"], rtol=1e-6)
        np.testing.assert_allclose(
            [v for _, v in ev["Misc/lr"]], [lr * math.exp(-1e-4 * i) for i in range(4)], rtol=1e-6
        )
        assert [s for s, _ in ev["Time/sps"]] == [4] and [s for s, _ in ev["Test/accuracy"]] == [4]
        from_csv, from_jsonl = _rows(r["logdir"])
        assert len(from_csv) == 2 * 4 + 3 and from_csv == from_jsonl


def test_mnist_epochs_drop_last_and_the_training_loss_falls(ex, tmp_path):
    """Whole epochs (partial last batch kept, as fwdgrad's DataLoader), epoch scalars per epoch."""
    over = ["model=logreg", "backend=torch", "grad=backprop", "optimization.learning_rate=0.005", "threads=1"]
    over += ["optimization.epochs=2", "dataset.max_train=100", "dataset.batch_size=32", "dataset.max_test=32"]
    r = ex["mnist"].train(_cfg("config", over, tmp_path))
    assert r["steps"] == 8  # 2 epochs of ceil(100 / 32) = 4 batches
    ev = _events(r["logdir"])
    assert [s for s, _ in ev["Time/batch_time"]] == [4, 8] and len(ev["Loss/train_loss"]) == 8
    assert np.mean(r["losses"][-3:]) < np.mean(r["losses"][:3])


def test_mnist_conv_trains_and_ports(ex, tmp_path):
    """fwdgrad's 64-channel ConvNet: a forward-gradient step on torch, and the same logits on JAX."""
    over = [
        "model=conv",
        "backend=torch",
        "steps=1",
        "dataset.batch_size=4",
        "dataset.max_test=4",
        "threads=1",
    ]
    r = ex["mnist"].train(_cfg("config", over, tmp_path))
    assert r["model"] == "ConvNet" and math.isfinite(r["final_loss"]) and "28x28" in r["data"]
    if "jax" in AVAILABLE:
        import jax.numpy as jnp

        import duogard as dg

        torch.manual_seed(0)
        module = importlib.import_module("fwdgrad_models").ConvNet(1, 10)
        x = np.random.default_rng(0).normal(size=(1, 1, 28, 28)).astype(np.float32)
        model = dg.from_torch(module, x)
        with torch.no_grad():
            ref = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(
            np.asarray(model.apply(model.params, jnp.asarray(x))), ref, rtol=1e-4, atol=1e-5
        )


def test_mnist_reads_idx_files_from_dataset_path(ex, tmp_path):
    from duogard.data import write_idx

    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("t10k", 8)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    over = ["model=logreg", "backend=torch", "steps=2", "dataset.batch_size=8", f"dataset.path={tmp_path}"]
    r = ex["mnist"].train(_cfg("config", over, tmp_path / "logs"))
    assert r["data"].startswith("MNIST from") and "24 train / 8 test" in r["data"] and r["steps"] == 2


def test_mnist_bad_settings_name_the_setting(ex, tmp_path):
    err = ex["fwdgrad_common"].ConfigError
    for over, needle in (
        (["dataset.path=/nonexistent/mnist"], "dataset.path"),
        (["grad=sideways"], "sideways"),
        (["grad=forward-activity"], "forward-activity"),
        (["optimization.learning_rate=-1"], "optimization.learning_rate"),
        (["backend=numpy"], "backend"),
        (["steps=0"], "steps"),
        (["model._target_=nowhere.Model"], "model._target_"),
    ):
        with pytest.raises(err, match=needle):
            ex["mnist"].train(_cfg("config", ["model=logreg", *over], tmp_path))


# ----------------------------------------------------------------------------- Beale, Rosenbrock


@pytest.mark.parametrize("grad", ["backprop", "forward"])
def test_beale_fwdgrad_run_reaches_the_minimum(ex, tmp_path, grad):
    """fwdgrad's run: 1000 plain SGD steps, lr 1e-2, from torch.rand(2) under seed 42."""
    backend = "jax" if "jax" in AVAILABLE else AVAILABLE[0]
    r = ex["global_optimization"].minimise(
        _cfg("global_optim", [f"backend={backend}", f"grad={grad}"], tmp_path), quiet=True
    )
    assert r["distance"] < 0.05 and r["value"] < 1e-3 < r["losses"][0]
    ev = _events(r["logdir"])
    assert set(ev) == {"Loss/train_loss", "Params/x", "Params/y", "Time/total"}
    assert [s for s, _ in ev["Loss/train_loss"]] == list(range(1, 1001))
    np.testing.assert_allclose(ev["Params/x"][-1][1], r["point"][0], rtol=1e-6)


@needs_both
def test_beale_same_path_on_both_backends(ex, tmp_path):
    """No randomness in backprop, shared tangents in forward: the same points on both backends."""
    for grad in ("backprop", "forward"):
        over = [f"grad={grad}", "iterations=100"]
        pts = [
            ex["global_optimization"].minimise(
                _cfg("global_optim", [*over, f"backend={b}"], tmp_path / b), quiet=True
            )["point"]
            for b in ("torch", "jax")
        ]
        np.testing.assert_allclose(pts[0], pts[1], rtol=1e-5)
        assert np.linalg.norm(np.subtract(pts[0], [0.8822692632675171, 0.9150039553642273])) > 0.1  # it moved


def test_rosenbrock_diverges_at_fwdgrads_rate_and_converges_at_ours(ex, tmp_path, monkeypatch):
    backend = AVAILABLE[-1]
    monkeypatch.setenv("DUOGARD_BACKEND", backend)  # backend=null honours $DUOGARD_BACKEND
    run = ex["global_optimization"].minimise
    with pytest.raises(
        FloatingPointError, match=r"rosenbrock .*learning_rate 0\.01\): the loss became inf at step"
    ):
        run(_cfg("global_optim", ["function=rosenbrock", "grad=backprop"], tmp_path), quiet=True)
    r = run(
        _cfg("global_optim", ["function=rosenbrock", "learning_rate=1e-3", "iterations=300"], tmp_path),
        quiet=True,
    )
    assert r["backend"] == backend and r["losses"][-1] < 0.1 * r["losses"][0]


def _run_script(name, *overrides, env=None):
    """Run ``examples/fwdgrad/<name>.py`` with Hydra overrides in a process of its own (Hydra's
    @hydra.main reconfigures logging and the standard streams, which would break pytest's
    capture for every later test of the worker if it ran in-process).
    """
    import os
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, str(HERE / f"{name}.py"), *overrides],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
    )


def test_global_optimization_runs_under_hydra_main(tmp_path):
    """The script's entry point (@hydra.main, command-line overrides), $DUOGARD_BACKEND choosing."""
    overrides = ("grad=backprop", "iterations=20", f"hydra.run.dir={tmp_path}")
    proc = _run_script("global_optimization", *overrides, env={"DUOGARD_BACKEND": "torch"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Iteration [1/20], Loss: " in proc.stdout
    assert "beale torch backprop: 20 iterations (lr 0.01)" in proc.stdout
    assert _events(tmp_path / "logs" / "beale_backprop_torch")["Loss/train_loss"][-1][0] == 20


def test_a_bad_setting_exits_2_with_one_line(tmp_path):
    proc = _run_script("mnist", "optimization.learning_rate=-1", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err == "mnist.py: error: optimization.learning_rate: expected a number > 0, got -1"
