"""The digits at MNIST's size, as MNIST's IDX files: a 28x28 dataset that needs no download."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from duogard.data._idx import IDX_FILES, write_idx

__all__ = ["upsample", "write_digits_idx"]


def _weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)``: linear interpolation from pixel centres (``align_corners=False``)."""
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    out = np.zeros((n_out, n_in))
    np.add.at(out, (np.arange(n_out), lo), 1 - frac)
    np.add.at(out, (np.arange(n_out), hi), frac)
    return out


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``(..., H, W)`` images to ``(..., size, size)`` (pixel centres aligned
    as in ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``).
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim < 2 or isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"upsample: expected (..., H, W) images and a positive int size, got {size!r}")
    rows, cols = _weights(images.shape[-2], size), _weights(images.shape[-1], size)
    return rows @ images @ cols.T


def write_digits_idx(
    directory: str | os.PathLike, *, size: int = 28, seed: int = 0, test_fraction: float = 0.2
) -> Path:
    """Write scikit-learn's digits, upsampled to ``size`` x ``size``, as the four MNIST IDX files
    in ``directory`` (uint8, the digits' [0, 1] times 255, rounded), with the split of
    ``load("digits", seed=seed, test_fraction=test_fraction)``.

    Then ``load("mnist", data_dir=directory)`` (or ``--dataset mnist --data-dir DIR``) reads
    them as MNIST: a stand-in of MNIST's shape for tests and quick runs, not MNIST (1438
    training and 359 test images of 8x8 digits made blurry, not 60000 and 10000).

    Returns:
        The directory.
    """
    from duogard.data._load import load  # the loader imports this module's siblings

    digits = load("digits", seed=seed, test_fraction=test_fraction, dtype="float64")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = []
    for x, y in ((digits.x_train, digits.y_train), (digits.x_test, digits.y_test)):
        pixels = np.clip(np.rint(upsample(x[:, 0], size) * 255.0), 0, 255).astype(np.uint8)
        arrays += [pixels, y.astype(np.uint8)]
    for stem, array in zip(IDX_FILES, arrays):
        write_idx(directory / stem, array)
    return directory
