"""Two-dimensional test functions for the global-optimisation experiments (Beale, Rosenbrock).

Each takes an array ``xy`` of shape ``(2,)`` (or ``(..., 2)``, e.g. a grid for a contour
plot) of any backend, NumPy included, and uses only indexing and arithmetic, so
``be.jvp`` and ``be.value_and_grad`` differentiate it on every backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Objective", "beale", "rosenbrock", "OBJECTIVES", "objective"]


def _split(name: str, xy):
    shape = tuple(getattr(xy, "shape", ()))
    if not shape or shape[-1] != 2:
        raise ValueError(
            f"{name}: expected an array of shape (2,) or (..., 2) holding (x, y), "
            f"got {type(xy).__name__} of shape {shape}"
        )
    return xy[..., 0], xy[..., 1]


def beale(xy):
    """Beale's function, ``(1.5 - x + xy)^2 + (2.25 - x + xy^2)^2 + (2.625 - x + xy^3)^2``.

    Global minimum 0 at (3, 0.5).
    """
    x, y = _split("beale", xy)
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def rosenbrock(xy):
    """Rosenbrock's banana function, ``(1 - x)^2 + 100 (y - x^2)^2``. Global minimum 0 at (1, 1)."""
    x, y = _split("rosenbrock", xy)
    return (1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2


@dataclass(frozen=True)
class Objective:
    """A test function with its standard start point, its minimum and a plotting window."""

    name: str
    fn: Callable
    start: tuple[float, float]
    minimum: tuple[float, float]
    min_value: float
    bounds: tuple[tuple[float, float], tuple[float, float]]

    def __call__(self, xy):
        return self.fn(xy)


#: The test functions by name. Start points are the standard ones of Moré, Garbow and
#: Hillstrom's test set ("Testing unconstrained optimization software", 1981):
#: Beale from (1, 1), Rosenbrock from (-1.2, 1).
OBJECTIVES: dict[str, Objective] = {
    "beale": Objective(
        "beale", beale, start=(1.0, 1.0), minimum=(3.0, 0.5), min_value=0.0, bounds=((-4.5, 4.5), (-4.5, 4.5))
    ),
    "rosenbrock": Objective(
        "rosenbrock",
        rosenbrock,
        start=(-1.2, 1.0),
        minimum=(1.0, 1.0),
        min_value=0.0,
        bounds=((-2.0, 2.0), (-1.0, 3.0)),
    ),
}


def objective(name: str) -> Objective:
    """The :class:`Objective` called ``name``; ValueError listing the names when unknown."""
    key = str(name).strip().lower()
    if key not in OBJECTIVES:
        raise ValueError(f"objective: unknown objective {name!r}; expected one of {list(OBJECTIVES)}")
    return OBJECTIVES[key]
