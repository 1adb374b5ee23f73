"""Tied weights: one tensor that a module holds under several names.

A language model's output layer often shares its embedding's weight (Hugging Face's
``tie_word_embeddings``: ``lm_head.weight is transformer.wte.weight``). ``state_dict`` lists
both names, ``named_parameters`` only the first; ``torch.export`` reads each name as its own
graph input. A ported model keeps ONE entry per shared tensor, under the first name (the one
``named_parameters`` gives, so the one :meth:`TorchModel.trainable` holds), and records the
others as its aliases: every use in the lowered graph reads that one entry
(:func:`with_aliases`), and :func:`resolve` writes one value to every name of a group when
params go back into a module.
"""

from __future__ import annotations

from itertools import chain

import numpy as np
from torch import nn

__all__ = ["aliases_of", "resolve", "tie_groups", "with_aliases"]


def tie_groups(module: nn.Module) -> dict[str, tuple[str, ...]]:
    """The names of every tensor ``module`` holds under more than one ``state_dict`` name.

    Returns:
        ``{first name: (first name, other names ...)}`` in ``state_dict`` order, only for the
        tensors that have several names; empty for a module without tied weights.
    """
    names = set(module.state_dict(keep_vars=True))
    by_tensor: dict[int, list[str]] = {}
    tensors = chain(
        module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)
    )
    for name, tensor in tensors:
        if name in names:
            by_tensor.setdefault(id(tensor), []).append(name)
    return {group[0]: tuple(group) for group in by_tensor.values() if len(group) > 1}


def aliases_of(groups: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """``{alias: the first name of its group}`` for every name but the first of each group."""
    return {alias: first for first, group in groups.items() for alias in group[1:]}


def with_aliases(params: dict, aliases: dict[str, str]) -> dict:
    """``params`` with every alias bound to its group's entry (the same array, not a copy)."""
    if not aliases:
        return params
    return {**params, **{alias: params[first] for alias, first in aliases.items() if first in params}}


def resolve(flat: dict, groups: dict[str, tuple[str, ...]], as_numpy, where: str) -> dict:
    """``flat`` with one value for every name of each tied group (to load into the module).

    A group given under one of its names gets that value under all of them; given under
    several, the values must be equal.

    Args:
        flat: state_dict names to arrays.
        groups: :func:`tie_groups` of the target module.
        as_numpy: converts one value to NumPy (to compare values given twice).
        where: the caller, for the error.

    Raises:
        ValueError: a group is given different values under two of its names.
    """
    out = dict(flat)
    for group in groups.values():
        given = [name for name in group if name in flat]
        if not given:
            continue
        first = np.asarray(as_numpy(flat[given[0]]))
        for other in given[1:]:
            if not np.array_equal(
                first, np.asarray(as_numpy(flat[other])), equal_nan=first.dtype.kind in "fc"
            ):
                raise ValueError(
                    f"{where}: {given[0]!r} and {other!r} are one tensor in the module (tied weights), "
                    "but params give them different values; give it once (a ported model's params "
                    f"hold it as {group[0]!r})"
                )
        for name in group:
            out[name] = flat[given[0]]
    return out
