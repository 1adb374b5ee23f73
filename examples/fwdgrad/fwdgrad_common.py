"""What the fwdgrad experiments share: the scalar log, the gradient method, the data, errors.

- :class:`ScalarLog`: every scalar goes to a TensorBoard event file (``tensorboardX``, which
  needs no PyTorch), to ``scalars.csv`` and to ``scalars.jsonl``, under the same tag and step,
  as fwdgrad's ``SummaryWriter.add_scalar`` calls did.
- :func:`method_of`: the ``grad`` setting (``forward``, ``backprop``,
  ``forward:num_tangents=4,distribution=rademacher``, ...) parsed with duogard's own parser.
- :func:`load_images`: MNIST from its IDX files when ``dataset.path`` is given, else the
  built-in digits upsampled from 8x8 to 28x28; normalised as fwdgrad did.
- :class:`ConfigError`: a bad setting; the scripts print it on one line and exit with 2.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
from pathlib import Path

import numpy as np

import duogard as dg
from duogard.methods import MethodError, parse_method

__all__ = [
    "ConfigError",
    "ScalarLog",
    "run_cli",
    "method_of",
    "backend_of_config",
    "load_images",
    "upsample",
    "run_dir",
]


class ConfigError(ValueError):
    """A setting of the experiment is invalid; the message names it, what was expected and what came."""


# ----------------------------------------------------------------------------- scalars


class ScalarLog:
    """Per-step scalars in three forms: a TensorBoard event file, CSV and JSONL.

    Args:
        directory: the run's folder (created); the event file, ``scalars.csv`` and
            ``scalars.jsonl`` go there.

    Every :meth:`add` writes one row ``tag, step, value, wall_time`` to each form, so the
    three always hold the same scalars. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, directory: str | os.PathLike):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as exc:  # pragma: no cover - an extra of the examples
            raise ImportError(
                "the fwdgrad examples write TensorBoard event files with tensorboardX: "
                "pip install tensorboardX"
            ) from exc
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._tb = SummaryWriter(logdir=str(self.directory))
        self._csv_file = open(self.directory / "scalars.csv", "w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._csv_file)
        self._csv.writerow(["tag", "step", "value", "wall_time"])
        self._jsonl = open(self.directory / "scalars.jsonl", "w", encoding="utf-8")
        self.closed = False

    def add(self, tag: str, value, step: int, wall_time: float | None = None) -> None:
        """Record ``value`` (a number) under ``tag`` at ``step`` in all three forms."""
        import time

        value = float(value)
        wall_time = time.time() if wall_time is None else float(wall_time)
        self._tb.add_scalar(tag, value, int(step), walltime=wall_time)
        self._csv.writerow([tag, int(step), repr(value), wall_time])
        self._jsonl.write(json.dumps({"tag": tag, "step": int(step), "value": value, "wall_time": wall_time}))
        self._jsonl.write("\n")

    def close(self) -> None:
        """Flush and close the three files (idempotent)."""
        if not self.closed:
            self._tb.close()
            self._csv_file.close()
            self._jsonl.close()
            self.closed = True

    def __enter__(self) -> ScalarLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_dir(logdir, name: str) -> Path:
    """``logdir/name``, where ``logdir`` None means Hydra's output folder (else ``./runs``)."""
    if logdir is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            logdir = Path(HydraConfig.get().runtime.output_dir) / "logs"
        except (ImportError, ValueError):  # not under @hydra.main (e.g. compose in a test)
            logdir = Path("runs")
    return Path(logdir) / re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


# ----------------------------------------------------------------------------- methods, backends


def method_of(spec, *, allow_activity: bool = False):
    """The gradient method of setting ``grad`` (duogard's names and ``name:option=value,...``).

    Raises:
        ConfigError: an unknown method or option, or ``forward-activity`` where the model is
            not a duogard Sequential (``allow_activity`` False).
    """
    if not isinstance(spec, str):
        raise ConfigError(f"grad: expected a gradient method name such as 'forward', got {spec!r}")
    try:
        method = parse_method(spec, flag="grad")
    except MethodError as exc:
        raise ConfigError(str(exc)) from None
    if method.name == "forward-activity" and not allow_activity:
        raise ConfigError(
            "grad: forward-activity perturbs the layers of a duogard nn.Sequential; these "
            "experiments train torch modules (or a test function): use forward, backprop or forward-exact"
        )
    if method.lr is not None:
        raise ConfigError(
            f"grad: the learning rate is a setting of its own here ({spec!r} has lr=); "
            "remove it and set optimization.learning_rate (MNIST) or learning_rate (global optimisation)"
        )
    return method


def backend_of_config(name):
    """The duogard backend of setting ``backend`` (None: ``$DUOGARD_BACKEND``, else the default).

    Raises:
        ConfigError: an unknown or uninstalled backend (the message says how to install it).
    """
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"backend: expected 'jax', 'torch' or null, got {name!r}")
    try:
        return dg.backend(name)
    except (ValueError, ImportError) as exc:
        where = "backend" if name is not None else "backend (from $DUOGARD_BACKEND)"
        raise ConfigError(f"{where}: {exc}") from None


def check_finite(where: str, value: float, step: int, hint: str) -> float:
    """``value`` when finite; else FloatingPointError naming the step and what to change."""
    if not math.isfinite(value):
        raise FloatingPointError(f"{where}: the loss became {value} at step {step}; {hint}")
    return value


# ----------------------------------------------------------------------------- data


def _interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` linear interpolation with the end pixels' centres aligned."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``(N, C, H, W)`` images to ``(N, C, size, size)`` (values stay in range)."""
    if images.ndim != 4:
        raise ValueError(f"upsample: images must have shape (N, C, H, W), got shape {images.shape}")
    rows = _interpolation_matrix(images.shape[2], size)
    cols = _interpolation_matrix(images.shape[3], size)
    return np.einsum("ih,nchw,jw->ncij", rows, images, cols)


def load_images(dataset_cfg, *, flat: bool, seed: int):
    """The training data of the MNIST experiment as a ``duogard.data.Dataset`` (float32).

    ``dataset_cfg.path`` set: MNIST's four IDX files (raw or ``.gz``) in that folder.
    Otherwise scikit-learn's built-in digits (1797 images of 8x8, an 80/20 split), upsampled
    bilinearly to 28x28 so that fwdgrad's networks apply unchanged. Pixels in [0, 1] are then
    normalised with ``(x - mean) / std`` (fwdgrad: MNIST's 0.1307 and 0.3081), and flattened
    for :class:`NeuralNet` (``flat``). ``max_train`` / ``max_test`` keep the first examples.

    Returns:
        ``(dataset, description)``.

    Raises:
        ConfigError: a missing folder or file, or a bad number.
    """
    path = dataset_cfg.get("path")
    limits = {}
    for key in ("max_train", "max_test"):
        value = dataset_cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"dataset.{key}: expected an int >= 1 or null, got {value!r}")
        limits[key] = value
    std = dataset_cfg.get("std", 1.0)
    if not isinstance(std, (int, float)) or not std > 0:
        raise ConfigError(f"dataset.std: expected a number > 0, got {std!r}")
    mean = dataset_cfg.get("mean", 0.0)
    if path is not None:
        folder = Path(str(path)).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"dataset.path: expected a folder holding MNIST's IDX files, got {str(path)!r}")
        try:
            data = dg.data.load("mnist", data_dir=folder, dtype="float64", **limits)
        except FileNotFoundError as exc:
            raise ConfigError(f"dataset.path: {exc}") from None
        what = f"MNIST from {folder} ({data.num_train} train / {data.num_test} test)"
    else:
        data = dg.data.load("digits", seed=seed, dtype="float64", **limits)
        data = dataclasses.replace(data, x_train=upsample(data.x_train, 28), x_test=upsample(data.x_test, 28))
        what = (
            f"built-in digits upsampled 8x8 -> 28x28 ({data.num_train} train / {data.num_test} test; "
            "no dataset.path given)"
        )
    x_train = ((data.x_train - mean) / std).astype(np.float32)
    x_test = ((data.x_test - mean) / std).astype(np.float32)
    data = dataclasses.replace(data, x_train=x_train, x_test=x_test)
    return (data.flattened() if flat else data), what


def run_cli(fn, cfg, script: str) -> None:
    """Run ``fn(cfg)`` as a Hydra entry point does here: a bad setting exits with 2, a diverged
    run with 1, one line each on stderr.
    """
    import logging
    import sys

    logging.getLogger("jax").setLevel(logging.WARNING)  # Hydra logs INFO: not JAX's platform probing
    try:
        fn(cfg)
    except ConfigError as exc:
        print(f"{script}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as exc:
        print(f"{script}: error: {exc}", file=sys.stderr)
        sys.exit(1)
