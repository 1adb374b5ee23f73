"""``load(name)``: the built-in datasets (digits, mnist, fashion-mnist, synthetic)."""

from __future__ import annotations

import functools
import os

import numpy as np

from duogard.data._dataset import Dataset, _check_positive, _check_seed, stratified_split
from duogard.data._idx import FASHION_CLASSES, load_idx_dataset

__all__ = ["load", "DATASETS"]

#: The dataset names :func:`load` knows.
DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "synthetic")

_SYNTHETIC_DEFAULTS = dict(num_examples=1000, num_features=16, num_classes=4, hidden=32)


def _float_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in ("float32", "float64"):
        raise ValueError(f"load: dtype must be 'float32' or 'float64', got {dtype!r}")
    return dt


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    images, target = _digits_from_file()
    if images is None:  # pragma: no cover - another scikit-learn layout
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
            raise ImportError("digits needs scikit-learn: pip install scikit-learn") from exc
        bunch = load_digits()
        images, target = bunch.images, bunch.target
    images, target = images.astype(np.float64), target.astype(np.int64)
    images.flags.writeable = target.flags.writeable = False
    return images, target


def _digits_from_file():
    """``load_digits``' images and targets read straight from the file scikit-learn ships
    (``sklearn/datasets/data/digits.csv.gz``: 64 pixels and the digit per row), found without
    importing scikit-learn (its import takes a second, a sixtieth of the main job); ``(None,
    None)`` where the file is not there (a test checks it against ``load_digits``).
    """
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None, None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        return None, None
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    if data.ndim != 2 or data.shape[1] != 65:
        return None, None
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def _digits(seed: int, test_fraction: float):
    images, target = _digits_raw()
    x = (images / 16.0)[:, None, :, :]  # (1797, 1, 8, 8) in [0, 1]
    train, test = stratified_split(target, test_fraction=test_fraction, seed=seed)
    return dict(
        x_train=x[train],
        y_train=target[train],
        x_test=x[test],
        y_test=target[test],
        num_classes=10,
        class_names=tuple(str(i) for i in range(10)),
        info={
            "source": "scikit-learn load_digits (UCI optical digits, 8x8, 0..16 / 16)",
            "split": f"stratified, test_fraction={test_fraction}, seed={seed}",
        },
    )


def _idx(name: str, data_dir, test_fraction):
    if test_fraction is not None:
        raise ValueError(
            f"load({name!r}): test_fraction must be None: {name} has an official "
            f"test set (t10k), which is used as is; got test_fraction={test_fraction!r}"
        )
    x_train, y_train, x_test, y_test = load_idx_dataset(name, data_dir)
    scale = lambda a: (a.astype(np.float64) / 255.0)[:, None, :, :]  # noqa: E731
    return dict(
        x_train=scale(x_train),
        y_train=y_train,
        x_test=scale(x_test),
        y_test=y_test,
        num_classes=10,
        class_names=FASHION_CLASSES if name == "fashion-mnist" else tuple(map(str, range(10))),
        info={"source": f"IDX files ({name}), uint8 / 255", "split": "official (train / t10k)"},
    )


def _synthetic(
    seed: int, test_fraction: float, *, num_examples: int, num_features: int, num_classes: int, hidden: int
):
    for arg, value in dict(
        num_examples=num_examples, num_features=num_features, num_classes=num_classes, hidden=hidden
    ).items():
        _check_positive("load('synthetic')", arg, value)
    if num_classes < 2:
        raise ValueError(f"load('synthetic'): num_classes must be >= 2, got {num_classes}")
    rng = np.random.Generator(np.random.PCG64(seed))
    x = rng.standard_normal((num_examples, num_features))
    teacher = {
        "w1": rng.standard_normal((num_features, hidden)) / np.sqrt(num_features),
        "b1": 0.1 * rng.standard_normal(hidden),
        "w2": rng.standard_normal((hidden, num_classes)) / np.sqrt(hidden),
    }
    logits = np.tanh(x @ teacher["w1"] + teacher["b1"]) @ teacher["w2"]
    # Centre each class's logit over the data, so that argmax gives roughly balanced classes.
    y = np.argmax(logits - logits.mean(axis=0), axis=1).astype(np.int64)
    train, test = stratified_split(y, test_fraction=test_fraction, seed=seed)
    return dict(
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        num_classes=num_classes,
        class_names=None,
        info={
            "source": "random teacher network: y = argmax(tanh(x w1 + b1) w2), x ~ N(0, I)",
            "teacher": teacher,
            "split": f"stratified, test_fraction={test_fraction}, seed={seed}",
        },
    )


def load(
    name: str = "digits",
    *,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    test_fraction: float | None = None,
    flatten: bool = False,
    dtype: str = "float32",
    max_train: int | None = None,
    max_test: int | None = None,
    **options,
) -> Dataset:
    """Load a dataset into memory as a :class:`Dataset` of NumPy arrays (never downloads).

    Names (:data:`DATASETS`):

    - ``"digits"`` (default): scikit-learn's ``load_digits``, 1797 real 8x8 handwritten
      digits shipped with scikit-learn, scaled to [0, 1] (pixel / 16). Split: stratified per
      class, ``test_fraction`` (default 0.2) of each class to the test set, chosen with
      ``seed``; both sets are then in a seeded random order.
    - ``"mnist"``, ``"fashion-mnist"``: the four standard IDX files (raw or ``.gz``) in
      ``data_dir`` (default ``$DUOGARD_DATA_DIR``, else ``./data``) or in a subfolder named
      after the dataset; scaled to [0, 1] (pixel / 255), official train / t10k split
      (``test_fraction`` must stay None). A clear FileNotFoundError says what is missing.
    - ``"synthetic"``: Gaussian inputs labelled by a random teacher network (seeded).
      Options: ``num_examples=1000, num_features=16, num_classes=4, hidden=32``; stratified
      split as for digits.

    Images are NCHW, ``(N, 1, H, W)``; ``flatten=True`` gives ``(N, H*W)`` for MLPs (same as
    :meth:`Dataset.flattened`). ``dtype`` is "float32" (default) or "float64"; labels are
    int64. ``max_train`` / ``max_test`` keep only the first examples of each set (for quick
    runs). ``seed`` drives the split (digits, synthetic) and the teacher (synthetic).
    """
    if not isinstance(name, str):
        raise TypeError(f"load: name must be a str, one of {list(DATASETS)}; got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise ValueError(f"load: unknown dataset {name!r}; expected one of {list(DATASETS)}")
    seed = _check_seed(f"load({key!r})", seed)
    dtype = _float_dtype(dtype)
    allowed = _SYNTHETIC_DEFAULTS if key == "synthetic" else {}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"load({key!r}): unknown option(s) {unknown}; "
            f"{'accepted: ' + str(sorted(allowed)) if allowed else 'it takes none'}"
        )

    if key == "digits":
        parts = _digits(seed, 0.2 if test_fraction is None else test_fraction)
    elif key == "synthetic":
        parts = _synthetic(
            seed, 0.2 if test_fraction is None else test_fraction, **{**_SYNTHETIC_DEFAULTS, **options}
        )
    else:
        parts = _idx(key, data_dir, test_fraction)

    for split, limit in (("train", max_train), ("test", max_test)):
        if limit is not None:
            limit = _check_positive(f"load({key!r})", f"max_{split}", limit)
            parts[f"x_{split}"] = parts[f"x_{split}"][:limit]
            parts[f"y_{split}"] = parts[f"y_{split}"][:limit]
    for split in ("train", "test"):
        x = np.ascontiguousarray(parts[f"x_{split}"], dtype=dtype)
        parts[f"x_{split}"] = x.reshape(len(x), -1) if flatten else x
        parts[f"y_{split}"] = np.ascontiguousarray(parts[f"y_{split}"], dtype=np.int64)
    return Dataset(name=key, **parts)
