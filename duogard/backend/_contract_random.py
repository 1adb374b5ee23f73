"""The backend contract's randomness: explicit keys and draws (a part of :class:`Backend`).

Every backend implements duogard's portable Philox-4x32-10 generator
(:mod:`duogard.backend._philox` is its specification): the same keys and, by default, the same
numbers on every backend; ``generator="native"`` draws with the framework's own generator.
Every draw takes float16, bfloat16, float32 and float64: portable float16 and bfloat16 numbers
are the float32 ones rounded (so they too are equal on every backend).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["RandomOps"]


class RandomOps(Protocol):
    """Explicit-key randomness: keys, ``split``/``fold_in``, and draws."""

    def key(self, seed: int) -> Any:
        """A random key from an integer seed: its two 32-bit words ``(hi, lo)``."""

    def split(self, key: Any, num: int = 2) -> Any:
        """``num`` new independent keys from ``key``, stacked along the first axis (the same
        words on every backend).
        """

    def fold_in(self, key: Any, data: int) -> Any:
        """A new key from ``key`` and the integer ``data`` (the same words on every backend)."""

    def fold_in_many(self, key: Any, data: Sequence[int]) -> Any:
        """``fold_in(key, d)`` for every ``d`` in ``data``, stacked along the first axis (the
        keys of a model's leaves): one pass of the generator, where a program would otherwise
        compile one per key.
        """

    def key_data(self, key: Any) -> Any:
        """The key's words as a NumPy uint32 array (for checkpoints); :meth:`key_from_data`
        inverts it.
        """

    def key_from_data(self, data: Any) -> Any:
        """The key whose :meth:`key_data` is ``data``."""

    def normal(
        self,
        key: Any,
        shape: Sequence[int],
        dtype: Any = "float32",
        device: Any = None,
        generator: str = "portable",
    ) -> Any:
        """Standard normal numbers of ``shape``.

        ``generator="portable"`` (default): the specification's numbers, equal on every backend
        to float rounding; ``"native"``: the framework's generator (``jax.random.normal`` with the
        key's words as a threefry key; a ``torch.Generator`` seeded from the key).
        """

    def rademacher(
        self,
        key: Any,
        shape: Sequence[int],
        dtype: Any = "float32",
        device: Any = None,
        generator: str = "portable",
    ) -> Any:
        """Independent signs, -1 or +1 with probability 1/2 each, of ``shape`` (portable: equal
        bit for bit on every backend).
        """

    def uniform(
        self,
        key: Any,
        shape: Sequence[int],
        dtype: Any = "float32",
        minval: float = 0.0,
        maxval: float = 1.0,
        device: Any = None,
        generator: str = "portable",
    ) -> Any:
        """Uniform numbers in ``[minval, maxval)`` of ``shape`` (portable: in the open interval)."""

    def bernoulli(
        self, key: Any, p: float, shape: Sequence[int], device: Any = None, generator: str = "portable"
    ) -> Any:
        """A bool array of ``shape``, each entry True with probability ``p`` (portable:
        ``uniform < p``).
        """

    def draw_rows(
        self,
        kind: str,
        keys: Sequence[Any],
        sizes: Sequence[int],
        rows: int,
        dtype: Any = "float32",
        device: Any = None,
        generator: str = "portable",
    ) -> Any:
        """A ``(rows, sum(sizes))`` array of blocks side by side, each from its own key.

        Block ``j`` (``sizes[j]`` columns) is ``kind(keys[j], (rows, sizes[j]))``: it depends on
        ``keys[j]`` alone, so a leaf's tangent can be drawn again on its own. The forward
        estimators draw their flat ``(K, n)`` tangents with it. The portable generator draws
        the small blocks together, in one pass with a key per element (the same numbers).

        Args:
            kind: ``"normal"`` or ``"rademacher"``.
            keys: one key per block.
            sizes: the blocks' widths.
            rows: the number of rows.
            dtype: the dtype.
            device: where the result goes.
            generator: ``"portable"`` or ``"native"``.

        Raises:
            ValueError: another ``kind`` or ``generator``, or not one key per block.
        """
