"""The house's layout: the front end imports no framework and names none in code, no library file
grows past ~500 lines, every public module's __all__ is complete."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

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


# ----------------------------------------------------------------------------- framework names


#: What the front end may say about a framework in code (docstrings and comments may say
#: anything): one entry per file and reason, and no other. The backend registry is the one place
#: that names the built-in backends: their packages, the default order and pair, their extras
#: (for a source checkout, where no entry points are installed; a test checks they equal
#: pyproject's).
ALLOWED_FRAMEWORK_NAMES = {
    "duogard/backend/__init__.py": "the registry: the built-in backends, their order and their extras",
}
#: Underscore attributes the front end may probe with getattr/hasattr, with the reason.
ALLOWED_PRIVATE_PROBES = {
    "_fields": "NamedTuple's documented field list (optimizer states), public despite the underscore",
}
_FRAMEWORK = re.compile(r"^(jax|jaxlib|torch|optax|array_api_compat|duogard_jax|duogard_torch)(\.|$)")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (or, below, names in ``__all__``)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _framework_uses(path: Path) -> list[str]:
    """Where ``path`` names a framework in code: imports, ``jax.``/``torch.`` attribute access,
    string literals that are a framework's or a backend package's name (``"torch"``,
    ``"jax._src.xla_bridge"``), ``sys.modules``, ``_cache_size``, and getattr/hasattr probes of
    underscore attributes.
    """
    tree = ast.parse(path.read_text())
    docs = _docstrings(tree)
    for node in ast.walk(tree):  # __all__ names the module's own attributes (duogard.torch)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            docs |= {id(c) for c in ast.walk(node.value)}
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if _FRAMEWORK.match(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and _FRAMEWORK.match(node.module):
            found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.Attribute):
            if (
                isinstance(node.value, ast.Name)
                and node.value.id in ("jax", "torch", "sys")
                and (node.value.id != "sys" or node.attr == "modules")
            ):
                found.append(f"{where} {node.value.id}.{node.attr}")
            if node.attr == "_cache_size":
                found.append(f"{where} ._cache_size")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if _FRAMEWORK.match(node.value):
                found.append(f"{where} {node.value!r}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in ("getattr", "hasattr") and len(node.args) >= 2:
                attr = node.args[1]
                if isinstance(attr, ast.Constant) and isinstance(attr.value, str):
                    name = attr.value
                    if (
                        name.startswith("_")
                        and not name.startswith("__")
                        and name not in ALLOWED_PRIVATE_PROBES
                    ):
                        found.append(f"{where} {node.func.id}(..., {name!r})")
    return found


def test_the_front_end_names_no_framework_in_code():
    """duogard/ asks its backends (the contract, the registered extras) instead of naming a
    framework: no framework imports, no jax./torch. attributes, no "jax"/"torch" literals to
    compare with, no sys.modules look-ups, no probes of private attributes."""
    uses = []
    for path in sorted((ROOT / "duogard").rglob("*.py")):
        if str(path.relative_to(ROOT)) not in ALLOWED_FRAMEWORK_NAMES:
            uses += _framework_uses(path)
    assert not uses, "\n".join(uses)


def test_the_framework_name_check_finds_what_it_looks_for():
    """The check above is not vacuous: each kind of use is found, docstrings are not."""
    sample = ROOT / "duogard" / "_sample_for_the_layout_test.py"
    code = (
        '"""Docstrings may say "torch" and jax.jit."""\n'
        "import sys\nimport torch\nfrom jax import numpy\n"
        'def f(be, x, fn):\n    """torch"""\n'
        '    if be.name == "torch":\n        return torch.ones(1)\n'
        '    sys.modules.get("jax._src.xla_bridge")\n'
        '    getattr(x, "_backends", None)\n    return fn._cache_size()\n'
    )
    try:
        sample.write_text(code)
        uses = _framework_uses(sample)
    finally:
        sample.unlink()
    text = "\n".join(uses)
    for what in ("import torch", "from jax import", "'torch'", "torch.ones", "sys.modules",
                 "'jax._src.xla_bridge'", "'_backends'", "._cache_size"):  # fmt: skip
        assert what in text, (what, text)
    assert len(uses) == 8, text


# ----------------------------------------------------------------------------- the command line


#: Where the library may name its command-line package, with the reason, and no other place.
ALLOWED_CLI_NAMES = {
    "duogard/__main__.py": "``python -m duogard`` is the command itself",
    "duogard/__init__.py": "the attribute ``duogard.cli``, imported on first use, never by the library",
}


def _cli_imports(source: str, module: str) -> list[str]:
    """Where ``source`` (the code of ``module``, dotted) imports ``duogard.cli``: ``import``,
    ``from ... import`` (absolute or relative, ``from duogard import cli`` included) and
    ``importlib.import_module("duogard.cli...")``."""

    def is_cli(name: str) -> bool:
        return name == "duogard.cli" or name.startswith("duogard.cli.")

    package = module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", "?")
        if isinstance(node, ast.Import):
            found += [f"{module}:{line} import {a.name}" for a in node.names if is_cli(a.name)]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            if is_cli(base) or any(is_cli(f"{base}.{a.name}") for a in node.names):
                found.append(f"{module}:{line} from {base} import ...")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and is_cli(node.value):
            found.append(f"{module}:{line} {node.value!r}")
    return found


def test_no_library_module_imports_the_command_line():
    """The command line is a front on the library: the library (``duogard/`` outside
    ``duogard/cli/``) never imports it, so what a user can call lives in the library (the main
    job is ``duogard.comparison``, the method grammar ``duogard.methods``)."""
    found = []
    for path in sorted((ROOT / "duogard").rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("duogard", "cli") or str(rel) in ALLOWED_CLI_NAMES:
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        found += _cli_imports(path.read_text(), module if path.name != "__init__.py" else module + ".x")
    assert not found, "\n".join(found)


def test_the_command_line_import_check_finds_what_it_looks_for():
    code = (
        "import duogard.cli\nfrom duogard.cli.compare import run\nfrom duogard import cli\n"
        "from ..cli import _options\nimport importlib\nimportlib.import_module('duogard.cli.train')\n"
        "from duogard import climate, comparison\nimport duogard.client\n"
    )
    text = "\n".join(_cli_imports(code, "duogard.train.checkpoint"))
    for what in ("import duogard.cli", "from duogard.cli.compare import", ":3 from duogard import",
                 "from duogard.cli import", "'duogard.cli.train'"):  # fmt: skip
        assert what in text, (what, text)
    assert len(text.splitlines()) == 5, text


# ----------------------------------------------------------------------------- the public surface


def _public_modules() -> list[str]:
    import duogard

    names = ["duogard"] + [m.name for m in pkgutil.walk_packages(duogard.__path__, "duogard.")]
    return [n for n in names if not any(p.startswith("_") for p in n.split("."))]


def test_every_public_module_lists_its_public_definitions_in_all():
    """A public module (no part of its name starts with "_") has an __all__ naming every public
    function and class it defines, and everything __all__ names is there (or a registered extra)."""
    from duogard.backend import registered_extras

    problems = []
    for name in _public_modules():
        module = importlib.import_module(name)
        listed = getattr(module, "__all__", None)
        if listed is None:
            problems.append(f"{name}: no __all__")
            continue
        for n, v in vars(module).items():
            own = (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == name
            if own and not n.startswith("_") and n not in listed:
                problems.append(f"{name}.{n}: not in __all__")
        for n in listed:
            if n not in vars(module) and f"{name}.{n}" not in registered_extras():
                problems.append(f"{name}.{n}: in __all__, neither defined nor a registered extra")
    assert not problems, "\n".join(problems)


def test_registered_extras_and_backends_are_pyprojects():
    """The registry's built-in fallback (a source checkout) says what pyproject's entry points say."""
    registry = importlib.import_module("duogard.backend")  # the package, for its private tables
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert project["duogard.backends"] == registry._BUILTIN
    assert project["duogard.extras"] == registry._BUILTIN_EXTRAS
    for public, target in registry._BUILTIN_EXTRAS.items():
        module, _, attr = target.partition(":")
        assert public.startswith("duogard.") and module.split(".")[0] in registry._BUILTIN.values(), public


_SURFACE = r"""
import sys, time
t = time.perf_counter()
import duogard
took = time.perf_counter() - t
frameworks = [m for m in sys.modules if m.split(".")[0] in ("jax", "torch", "jaxlib", "optax")]
eager = all(f"duogard.{p}" in sys.modules for p in ("optim", "grad", "data", "train", "interop", "parity"))
print(frameworks, eager, "duogard.cli" in sys.modules, took)
"""


@pytest.mark.integration  # starts a Python process
def test_import_duogard_is_explicit_and_imports_no_framework():
    """``import duogard`` imports its framework-free packages (explicit re-exports), no framework,
    and not the command line."""
    proc = subprocess.run([sys.executable, "-c", _SURFACE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frameworks, eager, cli, _ = proc.stdout.rsplit(" ", 3)
    assert frameworks == "[]" and eager == "True" and cli == "False", proc.stdout


def test_a_third_backends_extra_needs_no_front_end_change(monkeypatch):
    """An extra registered by another distribution (here: the standard library's json.dumps as
    ``duogard.interop.dumps``) shows in dir() and resolves, with no change to the front end."""
    import duogard.interop

    registry = importlib.import_module("duogard.backend")
    extras = {**registry.registered_extras(), "duogard.interop.dumps": "json:dumps"}
    monkeypatch.setattr(registry, "registered_extras", lambda: extras)
    monkeypatch.delitem(vars(duogard.interop), "dumps", raising=False)
    assert "dumps" in dir(duogard.interop)
    assert duogard.interop.dumps is json.dumps
    monkeypatch.delitem(vars(duogard.interop), "dumps")
    assert not hasattr(duogard.interop, "nope")
