"""The in-memory dataset and its seeded, step-indexed batching (NumPy only)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Dataset", "stratified_split"]


def _check_seed(where: str, seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{where}: seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_positive(where: str, arg: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{where}: {arg} must be a positive int, got {value!r}")
    return int(value)


def stratified_split(labels: np.ndarray, *, test_fraction: float, seed: int):
    """Seeded stratified split: ``(train_idx, test_idx)``, each in a seeded random order.

    Within every class, ``round(count * test_fraction)`` examples (at least one when the class
    has two or more) go to the test set, chosen by a NumPy ``PCG64`` generator seeded with
    ``seed``. The result depends only on the labels, the fraction and the seed.
    """
    if (
        not isinstance(test_fraction, (float, int))
        or isinstance(test_fraction, bool)
        or not (0.0 < float(test_fraction) < 1.0)
    ):
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    rng = np.random.Generator(np.random.PCG64(_check_seed("stratified_split", seed)))
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * float(test_fraction)))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx = rng.permutation(np.concatenate(train))
    test_idx = rng.permutation(np.concatenate(test))
    return train_idx, test_idx


@dataclass(eq=False)
class Dataset:
    """A supervised dataset held in NumPy arrays, with deterministic batching.

    ``x_*`` are float arrays whose first axis is the example axis (images are NCHW,
    ``(N, 1, H, W)``, unless flattened); ``y_*`` are int64 class labels in
    ``[0, num_classes)``. Nothing here imports a framework: the trainer converts batches
    with ``be.asarray``, so both backends see identical batches.

    Batching: the training order of epoch ``e`` is a permutation drawn by NumPy from
    ``(seed, e)``; step ``s`` reads batch ``s % steps_per_epoch`` of epoch
    ``s // steps_per_epoch``. :meth:`batch_at` therefore gives any step's batch directly, and
    resuming at step 50 yields the same batches as an uninterrupted run.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    _perm_cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
                raise TypeError(
                    f"Dataset({self.name!r}): x_{split} and y_{split} must be NumPy "
                    f"arrays, got {type(x).__name__} and {type(y).__name__}"
                )
            if y.ndim != 1 or len(x) != len(y):
                raise ValueError(
                    f"Dataset({self.name!r}): expected y_{split} of shape ({len(x)},), got {y.shape}"
                )
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(
                    f"Dataset({self.name!r}): y_{split} labels must lie in "
                    f"[0, {self.num_classes}), got [{y.min()}, {y.max()}]"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"Dataset({self.name!r}): train and test examples differ in shape: "
                f"{self.x_train.shape[1:]} vs {self.x_test.shape[1:]}"
            )

    # ------------------------------------------------------------------ description
    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example (without the batch axis), e.g. ``(1, 8, 8)`` or ``(64,)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def example_input(self) -> np.ndarray:
        """A small batch (the first two training examples), for ``model.init(seed, example)``."""
        return self.x_train[:2]

    @property
    def num_train(self) -> int:
        return len(self.x_train)

    @property
    def num_test(self) -> int:
        return len(self.x_test)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={self.num_train}, test={self.num_test}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes}, "
            f"dtype={self.x_train.dtype})"
        )

    def flattened(self) -> Dataset:
        """The same data with each example flattened to a vector: ``(N, prod(input_shape))``."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.reshape(self.num_train, -1),
            x_test=self.x_test.reshape(self.num_test, -1),
        )

    # ------------------------------------------------------------------ batching
    def steps_per_epoch(self, batch_size: int, *, drop_last: bool = True) -> int:
        """Number of training batches in one epoch."""
        batch_size = _check_positive("steps_per_epoch", "batch_size", batch_size)
        n = self.num_train
        if drop_last and batch_size > n:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {n} training examples of "
                f"{self.name!r} (with drop_last=True no batch would be left)"
            )
        return n // batch_size if drop_last else -(-n // batch_size)

    def epoch_order(self, epoch: int, *, seed: int = 0) -> np.ndarray:
        """The order of the training examples in ``epoch``: a permutation seeded by ``(seed, epoch)``."""
        seed = _check_seed("epoch_order", seed)
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch_order: epoch must be a non-negative int, got {epoch!r}")
        cache_key = (seed, int(epoch))
        if cache_key not in self._perm_cache:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, int(epoch)])))
            self._perm_cache.clear()  # one epoch at a time is all sequential reading needs
            self._perm_cache[cache_key] = rng.permutation(self.num_train)
        return self._perm_cache[cache_key]

    def batch_at(
        self, step: int, batch_size: int, *, seed: int = 0, drop_last: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """The training batch ``(x, y)`` of global step ``step`` (0-based), as NumPy arrays.

        Depends only on ``(step, batch_size, seed, drop_last)`` and the data, never on what
        was read before. With ``drop_last`` (the default) the incomplete last batch of each
        epoch is skipped, so every batch has exactly ``batch_size`` examples.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"batch_at: step must be a non-negative int, got {step!r}")
        per_epoch = self.steps_per_epoch(batch_size, drop_last=drop_last)
        epoch, index = divmod(int(step), per_epoch)
        idx = self.epoch_order(epoch, seed=seed)[index * batch_size : (index + 1) * batch_size]
        return self.x_train[idx], self.y_train[idx]

    def batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        start: int = 0,
        steps: int | None = None,
        drop_last: bool = True,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Training batches for steps ``start, start + 1, ...`` (forever when ``steps`` is None).

        ``batches(b, seed=s, start=50)`` yields exactly what an iterator started at 0 yields
        after its first 50 batches.
        """
        self.steps_per_epoch(batch_size, drop_last=drop_last)  # validates early
        if steps is not None and (
            isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0
        ):
            raise ValueError(f"batches: steps must be a non-negative int or None, got {steps!r}")
        step = int(start)
        stop = None if steps is None else step + int(steps)
        while stop is None or step < stop:
            yield self.batch_at(step, batch_size, seed=seed, drop_last=drop_last)
            step += 1

    def eval_batches(
        self, batch_size: int, *, split: str = "test"
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All examples of ``split`` ("test" or "train") in stored order, the last batch partial."""
        batch_size = _check_positive("eval_batches", "batch_size", batch_size)
        if split not in ("train", "test"):
            raise ValueError(f"eval_batches: split must be 'train' or 'test', got {split!r}")
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
