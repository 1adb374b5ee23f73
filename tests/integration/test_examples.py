"""The scripts in examples/: they run (as scripts, and through their main()), on both backends,
with backprop and forward gradients, and the optimisation example really converges."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import AVAILABLE, ROOT, load_script

EXAMPLES = ROOT / "examples"
MNIST_LIKE = ("logreg", "mnist_mlp", "mnist_cnn")
FINAL = re.compile(
    r"^(jax|torch) (\S+): final loss ([0-9.]+|nan), test accuracy ([0-9.]+), "
    r"([0-9.]+) ms/step",
    re.M,
)
POINT = re.compile(
    r"^(beale|rosenbrock)\s+(jax|torch) (\S+): \d+ steps .*-> \(([-0-9.]+), ([-0-9.]+)\), "
    r"f = \S+, distance to the minimum \S+ \S+ ([0-9.e+-]+)",
    re.M,
)
TINY = {  # settings that make each example a smoke test
    "beale_rosenbrock": ["--steps", "20"],
    "logreg": ["--steps", "4", "--batch-size", "16", "--quiet"],
    "mnist_mlp": ["--steps", "4", "--batch-size", "16", "--hidden", "16", "--quiet"],
    "mnist_cnn": ["--steps", "3", "--batch-size", "8", "--channels", "4", "--cnn-hidden", "16", "--quiet"],
}

needs_both = pytest.mark.skipif(len(AVAILABLE) < 2, reason="needs jax and torch")


def _module(name: str):
    return load_script(EXAMPLES / f"{name}.py", f"example_{name}")


@pytest.fixture(scope="module")
def examples():
    return {name: _module(name) for name in TINY}


def _run_main(mod, argv, capsys, monkeypatch, cwd):
    monkeypatch.chdir(cwd)  # --dataset auto looks in ./data: keep it away from the repository's
    monkeypatch.delenv("DUOGARD_DATA_DIR", raising=False)
    assert mod.main(argv) == 0
    return capsys.readouterr().out


# ---------------------------------------------------------------------------- as scripts


@needs_both
@pytest.mark.parametrize(
    "name,backend,grad",
    [
        ("beale_rosenbrock", "torch", "forward"),
        ("logreg", "jax", "forward"),
        ("mnist_mlp", "torch", "forward-activity"),
        ("mnist_cnn", "jax", "backprop"),
    ],
)
def test_example_runs_as_a_script(name, backend, grad, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DUOGARD_DATA_DIR"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--backend", backend, "--grad", grad, *TINY[name]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    if name == "beale_rosenbrock":
        found = POINT.findall(proc.stdout)
        assert [(f[0], f[1], f[2]) for f in found] == [
            ("beale", backend, grad),
            ("rosenbrock", backend, grad),
        ]
    else:
        assert "built-in digits" in proc.stdout  # no MNIST in tmp_path/data: the offline fallback
        (m,) = FINAL.findall(proc.stdout)
        assert m[0] == backend and m[1] == grad
        assert 0.0 <= float(m[3]) <= 1.0


# ---------------------------------------------------------------------------- in process: both x both


@pytest.mark.parametrize("grad", ["backprop", "forward"])
@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("name", MNIST_LIKE)
def test_mnist_examples_train_on_digits(examples, name, backend, grad, capsys, monkeypatch, tmp_path):
    out = _run_main(
        examples[name], ["--backend", backend, "--grad", grad, *TINY[name]], capsys, monkeypatch, tmp_path
    )
    assert "on digits" in out
    (m,) = FINAL.findall(out)
    assert m[:2] == (backend, grad)
    assert np.isfinite(float(m[2])) and 0.0 <= float(m[3]) <= 1.0 and float(m[4]) > 0


def test_mnist_defaults_follow_the_paper_on_mnist_and_shrink_on_digits(
    examples, capsys, monkeypatch, tmp_path
):
    from duogard.data import write_idx

    rng = np.random.default_rng(0)
    data = tmp_path / "idx"
    data.mkdir()
    for split, n in (("train", 32), ("t10k", 16)):
        write_idx(data / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(data / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    argv = ["--backend", AVAILABLE[0], "--steps", "1", "--batch-size", "8", "--quiet", "--lr", "0.01"]
    # --dataset auto picks MNIST up from --data-dir, and the MLP is the paper's 784-1024-1024-10
    out = _run_main(examples["mnist_mlp"], [*argv, "--data-dir", str(data)], capsys, monkeypatch, tmp_path)
    assert "MLP 784-1024-1024-10 (1,863,690 parameters) on mnist: 32 train / 16 test" in out
    # without the files it falls back to digits, with a smaller MLP, and says so
    out = _run_main(examples["mnist_mlp"], argv, capsys, monkeypatch, tmp_path)
    assert "using the built-in digits dataset" in out and "MLP 64-128-10 " in out
    out = _run_main(examples["logreg"], [*argv, "--data-dir", str(data)], capsys, monkeypatch, tmp_path)
    assert "784-10 (7,850 parameters) on mnist" in out


def test_mnist_example_usage_errors(examples, capsys, monkeypatch, tmp_path):
    """The examples are ``duogard train`` with their own defaults: usage errors exit 2 with the message."""
    monkeypatch.chdir(tmp_path)
    mod = examples["mnist_mlp"]
    for argv, needle in (
        (["--grad", "sideways"], "sideways"),
        (["--grad", "forward:tangents=3"], "tangents"),
        (["--steps", "-1"], "--steps"),
        (["--hidden", "12,x"], "--hidden"),
        (["--dataset", "mnist", "--data-dir", str(tmp_path)], "train-images-idx3-ubyte"),
    ):
        assert mod.main(argv) == 2
        assert needle in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse's own checks
        mod.main(["--steps", "ten"])
    assert exc.value.code == 2


def test_examples_are_duogard_train_with_their_own_defaults(examples):
    from duogard.cli.train import main as train_main

    for name, model in (("logreg", "logreg"), ("mnist_mlp", "mlp"), ("mnist_cnn", "cnn")):
        mod = examples[name]
        assert mod.DEFAULTS["model"] == model and mod.DEFAULTS["dataset"] == "auto"
        assert mod.train_main is train_main


# ---------------------------------------------------------------------------- Beale and Rosenbrock


@pytest.mark.parametrize("grad", ["backprop", "forward"])
@pytest.mark.parametrize("backend", AVAILABLE)
def test_beale_rosenbrock_prints_points_on_both_backends(
    examples, backend, grad, capsys, monkeypatch, tmp_path
):
    out = _run_main(
        examples["beale_rosenbrock"],
        ["--backend", backend, "--grad", grad, "--steps", "30"],
        capsys,
        monkeypatch,
        tmp_path,
    )
    found = POINT.findall(out)
    assert [f[:3] for f in found] == [("beale", backend, grad), ("rosenbrock", backend, grad)]
    for f in found:
        assert np.isfinite([float(f[3]), float(f[4]), float(f[5])]).all()


@pytest.mark.parametrize("grad", ["backprop", "forward"])
def test_beale_and_rosenbrock_converge_to_their_minima(examples, grad):
    """The example's default settings reach (3, 0.5) and (1, 1), with the true gradient and the
    forward gradient alike (JAX: a few thousand steps take about a second)."""
    mod = examples["beale_rosenbrock"]
    backend = "jax" if "jax" in AVAILABLE else AVAILABLE[0]
    method = mod.parse_method(grad)
    for name, minimum in (("beale", (3.0, 0.5)), ("rosenbrock", (1.0, 1.0))):
        r = mod.minimise(name, backend=backend, method=method, seed=0, **mod.DEFAULTS[name])
        assert r["distance"] < 0.02, (name, grad, r["point"])
        np.testing.assert_allclose(r["point"], minimum, atol=0.02)
        assert r["value"] < 1e-4


@needs_both
def test_beale_backprop_takes_the_same_path_on_both_backends(examples):
    """No randomness in backprop: both frameworks follow the same trajectory (float32 rounding aside)."""
    mod = examples["beale_rosenbrock"]
    method = mod.parse_method("backprop")
    points = [
        mod.minimise(
            "beale", backend=b, method=method, lr=0.01, decay=1e-3, steps=200, seed=0, dtype="float64"
        )["point"]
        for b in ("jax", "torch")
    ]
    np.testing.assert_allclose(points[0], points[1], rtol=1e-9)
    assert np.linalg.norm(points[0] - (1.0, 1.0)) > 0.1  # it moved


def test_beale_rosenbrock_usage_errors(examples, capsys):
    mod = examples["beale_rosenbrock"]
    for argv, needle in (
        (["--grad", "forward-activity"], "activations"),
        (["--lr", "-1"], "--lr"),
        (["--function", "himmelblau"], "himmelblau"),
    ):
        with pytest.raises(SystemExit) as exc:
            mod.main(argv)
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err


# ---------------------------------------------------------------------------- port_fwdgrad


PORT_ROW = re.compile(
    r"^  (hand-written torch\.func\.jvp loop|duogard port \((?:jax|torch), --grad \S+\))\s+loss ([0-9.]+)"
    r"  test accuracy ([0-9.]+) -> ([0-9.]+)",
    re.M,
)


def test_port_fwdgrad_ports_fwdgrads_models_and_settings(capsys, monkeypatch, tmp_path):
    """fwdgrad's NeuralNet / ConvNet and its SGD settings; the hand-written loop and the port run
    from the same initial weights."""
    pytest.importorskip("torch", reason="port_fwdgrad ports a torch script")
    mod = _module("port_fwdgrad")
    assert mod.FWDGRAD_SETTINGS == dict(lr=2e-4, momentum=0.0, decay=1e-4, clip=0.0, batch_size=64)
    counts = {m: sum(p.numel() for p in mod.make_module(m, 0).parameters()) for m in ("mlp", "logreg", "cnn")}
    assert counts == {"mlp": 1_863_690, "logreg": 7_850, "cnn": 3_333_962}
    monkeypatch.chdir(tmp_path)
    assert mod.main(["--backend", "torch", "--steps", "3", "--model", "logreg"]) == 0
    out = capsys.readouterr().out
    assert "logreg on built-in digits upsampled 8x8 -> 28x28" in out
    assert "3 steps, batch 64, SGD lr 0.0002 (momentum 0) * exp(-0.0001 step), clip 0" in out
    rows = PORT_ROW.findall(out)
    assert [r[0] for r in rows] == [
        "hand-written torch.func.jvp loop",
        "duogard port (torch, --grad forward)",
    ]
    assert rows[0][2] == rows[1][2]  # the same initial weights: the same accuracy before training
    assert all(np.isfinite(float(r[1])) and 0 <= float(r[3]) <= 1 for r in rows)
