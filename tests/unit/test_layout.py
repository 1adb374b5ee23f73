"""The house's layout: the front end imports no framework, no library file grows past ~500 lines."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT

_IMPORT_ALL = r"""
import importlib, pkgutil, sys
for name in ("torch", "jax", "jaxlib", "optax", "array_api_compat"):
    sys.modules[name] = None  # "import torch" now raises ImportError
import duogard
names = [m.name for m in pkgutil.walk_packages(duogard.__path__, "duogard.")
         if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
loaded = sorted(n for n in ("torch", "jax") if sys.modules.get(n) is not None)
print(len(names), loaded)
"""


@pytest.mark.integration  # starts a Python process
def test_every_front_end_module_imports_without_torch_or_jax():
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, loaded = proc.stdout.split(" ", 1)
    assert int(count) >= 40 and loaded.strip() == "[]", proc.stdout


@pytest.mark.integration  # starts a Python process
def test_a_missing_framework_says_how_to_install_it():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import duogard as dg\n"
        "try:\n    dg.torch.forward_grad_\nexcept ImportError as e:\n    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pip install torch==2.13.0" in proc.stdout


def test_no_library_file_is_over_about_500_lines():
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for folder in ("duogard", "backends", "benchmarks/duogard_bench")
        for p in (ROOT / folder).rglob("*.py")
    }
    assert sizes and max(sizes.values()) <= 530, sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
