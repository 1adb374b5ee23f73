"""Shared fixtures: every layer/loss/optimizer/estimator test runs on each backend.

Shared helpers (not fixtures) live in ``tests/helpers.py``; tests import them from there.
Everything under ``tests/integration/`` is marked ``integration`` here, and the end-to-end tests
elsewhere (trajectories, accuracy runs, torch.compile) carry the mark themselves: the fast loop
is ``pytest -m "not integration"``.

JAX's 64-bit mode is switched on once here, so float64 checks are real float64 on both
backends; every float32 test gives its dtypes explicitly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from pathlib import Path

import numpy as np
import pytest

import duogard as dg

from helpers import AVAILABLE

# glibc's malloc_trim (None elsewhere: macOS, musl)
try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 - glibc only
except (OSError, AttributeError):
    _LIBC = None

try:
    import jax

    jax.config.update("jax_enable_x64", True)
    # Most of the suite's time is XLA compiling many small programs once each; its optimisation
    # passes (fusion, layout, ...) are what cost, not running them. The programs mean the same
    # without them; DUOGARD_TEST_JAX_OPTIMIZE=1 keeps them (the benchmarks always do).
    if os.environ.get("DUOGARD_TEST_JAX_OPTIMIZE", "0") != "1":
        jax.config.update("jax_disable_most_optimizations", True)
    # ... and the same programs compile again on every run: XLA's persistent cache keeps them
    # on disk (tests/.jax-cache, ignored by git), so a second run of the fast loop skips most
    # compiling. DUOGARD_TEST_JAX_CACHE=0 switches it off; a cache that went stale is only
    # a cache miss (JAX keys every entry by the program, its options and the versions).
    if os.environ.get("DUOGARD_TEST_JAX_CACHE", "1") != "0":
        jax.config.update("jax_compilation_cache_dir", str(Path(__file__).parent / ".jax-cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
except ImportError:  # pragma: no cover - the torch-only install
    pass

try:
    import torch

    # The suite's shapes are tiny: one intra-op thread avoids OpenMP spin-waiting against
    # JAX's thread pool (and other processes) on a 2-core machine, which made steps 100x slower.
    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - the jax-only install
    pass


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


# A worker's resident memory, kept under this many MiB between tests (DUOGARD_TEST_RSS_MB)
_RSS_LIMIT = int(os.environ.get("DUOGARD_TEST_RSS_MB", "1200")) * 2**20
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # no procfs (macOS): never over the limit
        return 0


@pytest.fixture(autouse=True)
def _bounded_memory():
    """After a test that leaves the worker above the limit, drop JAX's in-memory caches of
    traced and compiled programs (a test's programs are rarely met again; on disk, the
    persistent cache above keeps them) and hand the freed heap back to the system (glibc keeps
    what was freed in its arenas). Without it an xdist worker grew past 5 GB over the suite;
    clearing after every module instead cost seconds a module (freeing an XLA executable takes
    milliseconds) and still let one module's programs reach 2.7 GB.
    """
    yield
    if _rss() < _RSS_LIMIT:
        return
    if "jax" in globals():
        jax.clear_caches()
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def pytest_collection_modifyitems(config, items):
    """Mark every test under tests/integration/ (subprocesses, torchrun, Hydra, examples, the
    command line, the bench) as ``integration``."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)
