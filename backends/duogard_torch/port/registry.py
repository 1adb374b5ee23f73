"""The rules' types, and the tables they are registered in by decorator.

An operator family (a module of :mod:`.aten`, or :mod:`.rules` for the fx spellings) owns one
:class:`RuleTable` and registers each rule next to its code::

    RULES = RuleTable("elementwise", AtenRule)

    @RULES.register(aten.add.Tensor, aten.add.Scalar, doc="a + alpha * b")
    def _add(rt, info, a, b, alpha=1): ...

:func:`merge` joins the families' tables into the one the lowering reads, and refuses an
operator that two families register. Nothing here is global: a table is a module's value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .helpers import training_key

__all__ = ["AtenRule", "FxRule", "NodeInfo", "RuleTable", "Run", "merge"]


@dataclass
class Run:
    """What every rule of the export path sees at run time: the backend, the step's key, ``x``'s
    device, the params.
    """

    be: Any
    key: Any
    device: Any
    params: dict

    def key_for(self, index: int, what: str):
        """The key of the ``index``-th random op (dropout): ``fold_in(key, index)``."""
        return training_key(self.be, self.key, index, what)


@dataclass
class NodeInfo:
    """What a rule may know about its node, fixed at lowering time."""

    name: str
    path: str = ""
    #: indices of this node's outputs that other nodes read (multi-output operators)
    used_outputs: set = field(default_factory=set)
    #: per-operator extras (the dropout counter, batch norm's cumulative-average buffer ...)
    extra: dict = field(default_factory=dict)
    #: the torch dtype of the node's (first) result, as export recorded it: what torch's type
    #: promotion gives, so what an elementwise rule computes in (None where not recorded)
    dtype: Any = None


@dataclass(frozen=True)
class AtenRule:
    """A core ATen operator's lowering.

    Attributes:
        fn: ``fn(rt, info, *args, **kwargs)`` with the operator's schema arguments (tensors as
            arrays of ``rt.be``).
        doc: what it lowers to, for the docs table.
        check: ``check(node, info)`` at lowering time; raises
            :class:`~duogard_torch.port.helpers.Unsupported` to refuse options the rule does not
            cover.
        bounded: its integer results are bounded by its inputs' values, the shapes or static
            arguments (a view, an index, ``arange``): computed in 32 bits (JAX without 64-bit
            mode) they lose nothing, so an int64 result is allowed there.
    """

    fn: Callable
    doc: str
    check: Callable | None = None
    bounded: bool = False


@dataclass(frozen=True)
class FxRule:
    """A ``torch.fx`` call target's lowering (the fallback path).

    Attributes:
        fn: ``fn(rt, index, <torch's parameter names and defaults>)``.
        check: the same parameters minus ``rt``/``index``, run at lowering time with fx Nodes for
            tensor arguments; raises :class:`~duogard_torch.port.helpers.Unsupported` to refuse.
    """

    fn: Callable
    check: Callable | None = None


class RuleTable:
    """One family's rules, keyed by operator (an ``OpOverload``, an fx target or a method name).

    Args:
        family: the family's name (said when two families register one operator).
        make: the rule type (:class:`AtenRule` or :class:`FxRule`), called as
            ``make(fn, **fields)``.
        defaults: fields every rule of the family has unless its registration says otherwise.
    """

    def __init__(self, family: str, make: Callable, **defaults):
        self.family = family
        self._make = make
        self._defaults = defaults
        self._rules: dict = {}

    def register(self, *keys, **fields) -> Callable:
        """A decorator: ``fn`` is the rule of every operator in ``keys`` (with ``fields``)."""
        if not keys:
            raise TypeError(f"RuleTable({self.family!r}).register: expected one operator or more, got none")

        def decorate(fn):
            for key in keys:
                self.add(key, fn, **fields)
            return fn

        return decorate

    def add(self, key, fn: Callable, **fields) -> None:
        """Register ``fn`` for ``key`` (rules made by a factory: ``add(op, _xp("exp"), doc=...)``)."""
        if key in self._rules:
            raise ValueError(f"{self.family}: {key} is registered twice")
        self._rules[key] = self._make(fn, **{**self._defaults, **fields})

    def alias(self, key, rule) -> None:
        """Register an existing rule (of any table) for ``key`` too."""
        if key in self._rules:
            raise ValueError(f"{self.family}: {key} is registered twice")
        self._rules[key] = rule

    def __getitem__(self, key):
        return self._rules[key]

    def __contains__(self, key) -> bool:
        return key in self._rules

    def __iter__(self) -> Iterator:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def items(self):
        return self._rules.items()


def merge(*tables: RuleTable) -> dict:
    """One dict of every table's rules.

    Raises:
        ValueError: two families register the same operator (naming both).
    """
    out: dict = {}
    owner: dict = {}
    for table in tables:
        for key, rule in table.items():
            if key in out:
                raise ValueError(f"{key} is registered by both {owner[key]} and {table.family}")
            out[key], owner[key] = rule, table.family
    return out
