"""The documented command of Ren et al.'s MNIST setting in shape (docs/methods.md, "The
LocalMixer"): LocalMixer rows of backprop, LG-BP and LG-FG-A from MNIST IDX files given with
``--data-dir``, run end to end on the digits upsampled to 28x28 (no download).
"""

from __future__ import annotations

import json

from duogard import data
from duogard.cli import main
from duogard.methods import LEARNING_RATES

from helpers import AVAILABLE

METHODS = "backprop;local-backprop;local-forward-activity"


def test_the_local_mixer_mnist_command_runs_on_the_upsampled_digits(tmp_path):
    idx = data.write_digits_idx(tmp_path / "digits28")
    out = tmp_path / "out"
    # the documented command, with tiny sizes and a hundred steps
    argv = ["compare", "--model", "local-mixer", "--dataset", "mnist", "--data-dir", str(idx),
            "--methods", METHODS, "--hidden", "16,16", "--groups", "4", "--steps", "100",
            "--batch-size", "32", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["config"]["model"] == "local-mixer" and result["config"]["dataset"] == "mnist"
    runs = result["runs"]
    assert [r["method"] for r in runs] == METHODS.split(";") * len(AVAILABLE)
    assert sorted({r["backend"] for r in runs}) == sorted(AVAILABLE)
    for r in runs:
        # 100 steps at the table's learning rates: every row learns (chance is 0.1)
        assert r["learning_rate"] == LEARNING_RATES["local-mixer"][r["method"]]
        assert 0.3 < r["test_accuracy"] <= 1.0, (r["backend"], r["method"], r["test_accuracy"])
