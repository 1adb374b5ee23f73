"""Datasets and test functions, framework-free (NumPy only; the trainer converts batches).

- :func:`load` (``"digits"`` by default, ``"mnist"``, ``"fashion-mnist"``, ``"synthetic"``)
  returns a :class:`Dataset`; its :meth:`Dataset.batch_at` / :meth:`Dataset.batches` give
  seeded, step-indexed batches, identical on every backend.
- :func:`read_idx` / :func:`write_idx`: the IDX format of MNIST and Fashion-MNIST;
  :func:`write_digits_idx` writes the digits upsampled to 28x28 as MNIST's four IDX files.
- :data:`OBJECTIVES`: Beale and Rosenbrock, for the global-optimisation experiments.
"""

from duogard.data._dataset import Dataset, stratified_split
from duogard.data._idx import IDX_FILES, IDX_SOURCES, read_idx, write_idx
from duogard.data._load import DATASETS, load
from duogard.data._objectives import OBJECTIVES, Objective, beale, objective, rosenbrock
from duogard.data._upsample import upsample, write_digits_idx

__all__ = [
    "load",
    "DATASETS",
    "Dataset",
    "stratified_split",
    "read_idx",
    "write_idx",
    "write_digits_idx",
    "upsample",
    "IDX_FILES",
    "IDX_SOURCES",
    "Objective",
    "OBJECTIVES",
    "objective",
    "beale",
    "rosenbrock",
]
