"""The benchmark suite of duogard (being split out of duogard/bench.py)."""
