"""The README's runnable Python blocks run as written (fragments, which start otherwise, are skipped)."""

from __future__ import annotations

import re

import pytest

from helpers import ROOT

README = ROOT / "README.md"
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if b.startswith("import")]


def test_readme_has_runnable_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.integration
@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i, capsys):
    exec(compile(BLOCKS[i], f"README block {i}", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert out.strip(), "a README example should print its result"


def test_worked_example_prints_one_one(capsys):
    block = next(b for b in BLOCKS if "sin(x[0])" in b)
    exec(compile(block, "worked example", "exec"), {})
    lines = [ln.split() for ln in capsys.readouterr().out.strip().splitlines()]
    for fields in lines:
        assert float(fields[1]) == pytest.approx(1.0, abs=1e-6)
        assert float(fields[2]) == pytest.approx(1.0, abs=1e-6)
