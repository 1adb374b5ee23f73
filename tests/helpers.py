"""Helpers the tests share (importable from every test folder: pytest's ``pythonpath``).

Fixtures live in ``conftest.py``; plain functions and constants live here, so a test imports
them by name instead of importing a conftest.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np

import duogard as dg

#: the repository's root
ROOT = Path(__file__).resolve().parents[1]

BACKENDS = ("jax", "torch")


def _available(name: str) -> bool:
    try:
        dg.backend(name)
        return True
    except ImportError:
        return False


AVAILABLE = tuple(b for b in BACKENDS if _available(b))


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


def one_rank_env(monkeypatch, world: int = 1):
    """A launch environment for a data-parallel fit in this process: the torchrun variables set
    and the torch backend's ``dist_init`` answering ``(0, world)`` without joining a group (its
    collectives then act on this rank alone). Returns the torch backend.
    """
    env = {"RANK": "0", "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    for var, val in env.items():
        monkeypatch.setenv(var, val)
    be = dg.backend("torch")
    monkeypatch.setattr(be, "dist_init", lambda timeout=300.0: (0, world))
    return be


def free_port() -> int:
    """A free port on loopback whose successor is free too (a data-parallel launch's
    ``MASTER_PORT``: JAX's coordinator takes ``MASTER_PORT + 1``).
    """
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports on loopback")


def child_pythonpath() -> str:
    """``$PYTHONPATH`` for a Python process a test starts: this checkout first, then the tests' own
    path, so the child imports the duogard and the backends under test (a checkout's, not another
    installed copy's: a backend lacking a contract name refuses to load).
    """
    return os.pathsep.join([str(ROOT), *(p for p in sys.path if p)])
