"""IDX files (the MNIST / Fashion-MNIST format): reading, writing, and the two loaders.

An IDX file is: two zero bytes, a type code, the number of dimensions ``n``; then ``n``
big-endian uint32 sizes; then the data, big-endian, row-major. The files may be gzipped
(detected from the content, not the name). Nothing is downloaded: the files must be on disk.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

__all__ = ["read_idx", "write_idx", "load_idx_dataset", "IDX_FILES", "IDX_SOURCES"]

_TYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("=").name if dt.itemsize > 1 else dt.name: code for code, dt in _TYPES.items()}

#: The four files each IDX dataset needs (images then labels; train then test).
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

#: Where the files come from (named, never fetched).
IDX_SOURCES = {
    "mnist": "the MNIST database of handwritten digits (Yann LeCun, Corinna Cortes and "
    "Christopher J.C. Burges; its official distribution page, or any mirror of it)",
    "fashion-mnist": "Zalando Research's Fashion-MNIST repository on GitHub "
    "(zalandoresearch/fashion-mnist, folder data/fashion)",
}

_SUBDIRS = {
    "mnist": ("mnist", "MNIST", "MNIST/raw"),
    "fashion-mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST", "FashionMNIST/raw", "fashion"),
}

FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (raw or gzipped) into a native-byte-order NumPy array.

    Raises ValueError naming the file when the magic number, the type code or the size is wrong.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"read_idx: {path} looks gzipped but does not decompress: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"read_idx: {path} is not an IDX file (expected the magic number to start "
            f"with two zero bytes, got {raw[:4].hex() or 'an empty file'})"
        )
    code, ndim = raw[2], raw[3]
    if code not in _TYPES:
        raise ValueError(
            f"read_idx: {path} has unknown IDX type code 0x{code:02x}; expected one "
            f"of {', '.join(f'0x{c:02x}' for c in _TYPES)}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"read_idx: {path} is truncated inside its header ({len(raw)} bytes, header needs {header})"
        )
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = _TYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"read_idx: {path} has {len(raw)} bytes but its header (shape {shape}, "
            f"{dtype.name}) implies {expected}; the file is truncated or corrupt"
        )
    data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzipped when ``path`` ends in ``.gz``); returns the path.

    Supported dtypes: uint8, int8, int16, int32, float32, float64.
    """
    array = np.asarray(array)
    name = array.dtype.name
    if name not in _CODES:
        raise TypeError(f"write_idx: array dtype must be one of {sorted(_CODES)}, got {name}")
    if array.ndim > 255:
        raise ValueError(f"write_idx: at most 255 dimensions, got {array.ndim}")
    code = _CODES[name]
    body = (
        bytes([0, 0, code, array.ndim])
        + np.asarray(array.shape, ">u4").tobytes()
        + np.ascontiguousarray(array, _TYPES[code]).tobytes()
    )
    path = Path(path)
    path.write_bytes(gzip.compress(body) if path.suffix == ".gz" else body)
    return path


def _find(directory: Path, stem: str) -> Path | None:
    # The official names, with or without .gz; some mirrors write "train-images.idx3-ubyte".
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _locate(name: str, data_dir: Path) -> dict[str, Path]:
    candidates = [data_dir] + [data_dir / sub for sub in _SUBDIRS[name]]
    looked = []
    for directory in candidates:
        found = {stem: _find(directory, stem) for stem in IDX_FILES}
        if all(found.values()):
            return found
        if directory.is_dir():
            missing = [s for s, p in found.items() if p is None]
            looked.append(f"  {directory}  (missing: {', '.join(missing)})")
        else:
            looked.append(f"  {directory}  (no such directory)")
    raise FileNotFoundError(
        f"{name}: the IDX files were not found. It needs these four files (raw or .gz) in one "
        f"directory:\n  "
        + "\n  ".join(IDX_FILES)
        + "\nLooked in:\n"
        + "\n".join(looked)
        + f"\nThey come from {IDX_SOURCES[name]}. duogard never downloads at run time: put "
        f"the files in --data-dir (or $DUOGARD_DATA_DIR), directly or in a subfolder named "
        f"{name}/."
    )


def _check_pair(name: str, images: np.ndarray, labels: np.ndarray, paths) -> None:
    img_path, lbl_path = paths
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{name}: {img_path} must hold uint8 images of shape (N, rows, cols), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(
            f"{name}: {lbl_path} must hold uint8 labels of shape (N,), got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{name}: {img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels"
        )
    if len(labels) and labels.max() > 9:
        raise ValueError(f"{name}: {lbl_path} has label {labels.max()}; expected 0..9")


def load_idx_dataset(name: str, data_dir: str | os.PathLike | None):
    """Read the four IDX files of ``name`` ("mnist" or "fashion-mnist").

    Returns ``(x_train, y_train, x_test, y_test)`` as uint8 images ``(N, 28, 28)`` (any size is
    accepted) and int64 labels. ``data_dir`` None means ``$DUOGARD_DATA_DIR``, else ``./data``.
    """
    if data_dir is None:
        data_dir = os.environ.get("DUOGARD_DATA_DIR", "data")
    files = _locate(name, Path(data_dir).expanduser().absolute())
    arrays = {stem: read_idx(path) for stem, path in files.items()}
    out = []
    for split in ("train", "t10k"):
        img, lbl = f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"
        _check_pair(name, arrays[img], arrays[lbl], (files[img], files[lbl]))
        out += [arrays[img], arrays[lbl].astype(np.int64)]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise ValueError(
            f"{name}: train images are {out[0].shape[1:]} but test images are {out[2].shape[1:]}"
        )
    return tuple(out)
