"""Pytrees: duogard's own (optree), the same on every backend."""

from duogard.tree import tree_flatten, tree_leaves, tree_map, tree_structure, tree_unflatten

__all__ = ["tree_flatten", "tree_leaves", "tree_map", "tree_structure", "tree_unflatten"]
