"""``duogard train --lora RANK`` (issue 28, item 4): LoRA adapters on the model's Linear layers,
the base from the model's init or from a checkpoint (``--lora-base``); the same run on both
backends ends at the same loss; a resume compares the LoRA flags; misuse exits 2 and says why."""

from __future__ import annotations

import json

import pytest

from duogard.cli import main

from helpers import AVAILABLE


def run(argv) -> int:
    try:
        return main(list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


BASE = ["train", "--hidden", "16", "--batch-size", "32", "--quiet"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lora", "0"], "--lora must be a positive int (the adapters' rank), got 0"),
        (["--lora-alpha", "4"], "--lora-alpha only applies with --lora RANK"),
        (["--lora-targets", "1"], "--lora-targets only applies with --lora RANK"),
        (["--lora", "2", "--lora-alpha", "-1"], "--lora-alpha must be > 0, got -1.0"),
        (
            ["--lora", "2", "--lora-targets", "9"],
            "--lora 2: lora: targets pattern '9' matches no Linear layer",
        ),
        (["--lora", "2", "--lora-base", "nowhere"], "--lora-base nowhere:"),
    ],
)
def test_lora_usage_errors_exit_2(capsys, argv, message):
    assert run([*BASE, "--steps", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(len(AVAILABLE) < 2, reason="needs both jax and torch installed")
def test_lora_fine_tunes_a_checkpointed_base_alike_on_both_backends(capsys, tmp_path):
    base_ck = tmp_path / "base"
    assert run([*BASE, "--steps", "30", "--optimizer", "adam", "--checkpoint", str(base_ck)]) == 0
    capsys.readouterr()

    def lora(rank, be, steps):
        flags = ["--lora", str(rank), "--lora-alpha", "8", "--lora-base", str(base_ck), "--optimizer", "adam"]
        return [*BASE, *flags, "--backend", be, "--steps", str(steps), "--grad", "forward:num_tangents=2"]

    summaries = {}
    for be in ("jax", "torch"):
        js = tmp_path / f"{be}.json"
        assert run([*lora(4, be, 20), "--json", str(js), "--checkpoint", str(tmp_path / be)]) == 0
        out = capsys.readouterr().out
        # adapters on both Linear layers: 4 (64 + 16) + 4 (16 + 10) parameters
        assert f"LoRA rank 4 alpha 8 on 2 Linear layers (1, 3; base from {base_ck})" in out
        assert "(424 parameters)" in out, out
        summaries[be] = json.loads(js.read_text())
    assert summaries["jax"]["final_loss"] == pytest.approx(summaries["torch"]["final_loss"], rel=1e-4)
    # a resume compares the LoRA flags like every other
    assert run([*lora(2, "jax", 25), "--resume", str(tmp_path / "jax")]) == 2
    assert "--lora 4 in the checkpoint, 2 now" in capsys.readouterr().err
    assert run([*lora(4, "jax", 25), "--resume", str(tmp_path / "jax")]) == 0
