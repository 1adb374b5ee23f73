"""Shared fixtures: every layer/loss/optimizer/estimator test runs on each backend.

JAX's 64-bit mode is switched on once here, so float64 checks are real float64 on both
backends; every float32 test gives its dtypes explicitly.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import duogard as dg

BACKENDS = ("jax", "torch")

try:
    import jax

    jax.config.update("jax_enable_x64", True)
    # Most of the suite's time is XLA compiling many small programs once each; its optimisation
    # passes (fusion, layout, ...) are what cost, not running them. The programs mean the same
    # without them; DUOGARD_TEST_JAX_OPTIMIZE=1 keeps them (the benchmarks always do).
    if os.environ.get("DUOGARD_TEST_JAX_OPTIMIZE", "0") != "1":
        jax.config.update("jax_disable_most_optimizations", True)
except ImportError:  # pragma: no cover - the torch-only install
    pass

try:
    import torch

    # The suite's shapes are tiny: one intra-op thread avoids OpenMP spin-waiting against
    # JAX's thread pool (and other processes) on a 2-core machine, which made steps 100x slower.
    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - the jax-only install
    pass


def _available(name: str) -> bool:
    try:
        dg.backend(name)
        return True
    except ImportError:
        return False


AVAILABLE = tuple(b for b in BACKENDS if _available(b))


@pytest.fixture(params=AVAILABLE)
def be(request):
    """The backend module under test (parametrised over the installed backends)."""
    return dg.backend(request.param)


@pytest.fixture
def both():
    """(jax, torch) backend modules, for cross-backend tests."""
    if len(AVAILABLE) < 2:
        pytest.skip("needs both jax and torch installed")
    return dg.backend("jax"), dg.backend("torch")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits as a duogard dataset (1797 8x8 images, 10 classes), loaded once a module."""
    return dg.data.load("digits")


TOL = {"float32": dict(rtol=1e-5, atol=1e-6), "float64": dict(rtol=1e-10, atol=1e-12)}


def to_backend(be, tree, dtype=None):
    """A NumPy pytree on backend ``be`` (optionally cast)."""
    return dg.tree.tree_map(
        lambda a: be.asarray(np.asarray(a) if dtype is None else np.asarray(a, dtype)), tree
    )


def to_numpy(be, tree):
    return dg.tree.tree_map(be.to_numpy, tree)


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def load_script(path, module_name: str):
    """A script (an example) imported by its file path as ``module_name``, without running its
    ``__main__`` block.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location(module_name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
