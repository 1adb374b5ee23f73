"""Gradient methods written as text, ``name[:option=value,...]``, and the default learning rates.

The grammar of ``duogard train --grad`` and ``duogard compare --methods``, of the examples'
settings and of the benchmarks: :func:`parse_method` reads one method into a
:class:`MethodSpec` (its estimator built once), :func:`parse_methods` a semicolon-separated
list; :data:`LEARNING_RATES` is the one table of default learning rates. A malformed method
raises :class:`MethodError` (a ``ValueError``), which the command reports as a usage error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MethodSpec",
    "MethodError",
    "parse_method",
    "parse_methods",
    "DEFAULT_METHODS",
    "LEARNING_RATES",
    "default_lr",
]


class MethodError(ValueError):
    """A gradient method written wrongly: a malformed option, a bad ``lr``, an unknown method or
    option, or an option of the wrong type. The message names where the text came from (the
    ``flag`` of :func:`parse_method`) and the valid choices. The command exits 2 on it, as on
    any usage error.
    """


#: The methods ``duogard compare`` runs by default; ``lr=`` is each one's SGD learning rate on
#: the digits MLP (a sweep on seed 0: forward estimates are noisier and take smaller steps).
DEFAULT_METHODS = (
    "backprop:lr=0.2",
    "forward:lr=0.005",
    "forward:tangents=rank1,distribution=rademacher,lr=0.005",
    "forward:num_tangents=16,distribution=rademacher,lr=0.03",
    "forward-activity:layerwise=true,lr=0.05",
)

#: The one table of default SGD learning rates, by model and gradient method, used when neither
#: ``--lr`` nor the method's own ``lr=`` is given (tuned on digits; Adam takes a tenth). SPSA's
#: differences tend to forward's directional derivatives, so it starts from forward's rates
#: (mlp swept for one query: 0.005 trains, 0.01 diverges).
LEARNING_RATES = {
    "logreg": {"backprop": 0.5, "forward-exact": 0.5, "forward": 0.03, "forward-activity": 0.4},
    "mlp": {"backprop": 0.2, "forward-exact": 0.2, "forward": 0.005, "forward-activity": 0.03},
    "cnn": {"backprop": 0.2, "forward-exact": 0.2, "forward": 0.005, "forward-activity": 0.003},
    # benchmarks/local_losses_sweep.py (seeds 0-2; local-forward and forward-guess: seed 0)
    "local-mlp": {
        "backprop": 0.15,
        "forward-exact": 0.15,
        "forward": 0.005,
        "local-backprop": 0.2,
        "local-forward-activity": 0.1,
        "local-forward": 0.01,
        "forward-guess": 0.1,
    },
    # benchmarks/local_mixer_sweep.py: default sizes on the digits at 28x28, 500 steps, seed 0,
    # JAX (the grid's best; local-forward-activity: the best mean of seeds 0-2; "forward" not
    # swept: the MLP's rate)
    "local-mixer": {
        "backprop": 0.2,
        "forward-exact": 0.2,
        "forward": 0.005,
        "local-backprop": 0.1,
        "local-forward-activity": 0.2,
        "local-forward": 0.1,
        "forward-guess": 0.4,
    },
}
for _rates in LEARNING_RATES.values():
    _rates["spsa"] = _rates["forward"]
_FALLBACK_LR = 0.01  # a method registered by a user, not in the table


def default_lr(model: str, method: str) -> float:
    """The default SGD learning rate of ``method`` on ``model`` (:data:`LEARNING_RATES`)."""
    return LEARNING_RATES.get(model, LEARNING_RATES["mlp"]).get(method, _FALLBACK_LR)


_BOOLEANS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


@dataclass(frozen=True)
class MethodSpec:
    """A gradient method as written in text (``--grad``, ``--methods``): ``name[:option=value,...]``.

    Options go to the estimator, except ``lr``: the method's own learning rate.

    Attributes:
        name: the estimator's name (``"forward"``).
        options: the estimator's options, as ``(name, value)`` pairs.
        lr: the method's own learning rate, or None.
        estimator: the estimator, built once by :func:`parse_method` (estimators hold only
            their options, so one serves every backend and run).
    """

    name: str
    options: tuple[tuple[str, Any], ...] = ()
    lr: float | None = None
    estimator: Any = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        """``name(option=value,...)``: how tables and logs name the method."""
        if not self.options:
            return self.name
        return self.name + "(" + ",".join(f"{k}={v}" for k, v in self.options) + ")"

    def learning_rate(self, model: str = "mlp") -> float:
        """This method's own ``lr=``, else the table's default for ``model``."""
        return self.lr if self.lr is not None else default_lr(model, self.name)


def _value(text: str):
    low = text.lower()
    if low in _BOOLEANS:
        return _BOOLEANS[low]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _options_of(name: str) -> dict[str, Any] | None:
    """The keyword options of estimator ``name`` with their defaults (None: unknown, or ``**kw``)."""
    import inspect

    from duogard.grad import ESTIMATORS

    cls = ESTIMATORS.get(name.strip().lower().replace("_", "-"))
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):  # unknown name (estimator() says so) or no signature
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name: p.default for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


_TYPE_NAMES = {bool: "true or false", int: "an int", float: "a number", str: "a word"}


def _option_value(flag: str, spec: str, method: str, key: str, text: str, valid: dict | None):
    """The value of option ``key``, typed like its default (the raw text for string options)."""
    if valid is None:
        return _value(text)
    if key not in valid:
        names = ", ".join([*valid, "lr"])
        raise MethodError(f"{flag}: {method!r} has no option {key!r} in {spec!r}; its options: {names}")
    default, value = valid[key], _value(text)
    kind = type(default) if isinstance(default, (bool, int, float, str)) else None
    if kind is str:
        return text
    ok = (
        kind is None
        or (kind is bool and isinstance(value, bool))
        or (kind is int and isinstance(value, int) and not isinstance(value, bool))
        or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
    )
    if not ok:
        raise MethodError(f"{flag}: option {key} of {method!r} must be {_TYPE_NAMES[kind]}, got {text!r}")
    return float(value) if kind is float else value


def parse_method(spec: str, *, flag: str = "--grad") -> MethodSpec:
    """``"forward:num_tangents=4,distribution=rademacher"`` -> a :class:`MethodSpec`.

    Args:
        spec: the method as written (on the command line, in a setting).
        flag: the flag it came from (named in errors).

    Returns:
        The parsed method, validated by building its estimator once.

    Raises:
        MethodError: a malformed option, a bad ``lr``, an unknown method or option, or an
            option of the wrong type (each message names ``flag`` and lists the valid choices).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise MethodError(f"{flag}: expected a gradient method name[:option=value,...], got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise MethodError(f"{flag}: a method name is missing before ':' in {spec!r}")
    valid = _options_of(name)
    opts, lr = [], None
    for item in filter(None, (p.strip() for p in rest.split(","))):
        k, eq, v = item.partition("=")
        if not eq:
            raise MethodError(f"{flag}: expected option=value in {spec!r}, got {item!r}")
        k = k.strip().replace("-", "_")
        if k == "lr":
            try:
                lr = float(v)
            except ValueError:
                raise MethodError(f"{flag}: option lr must be a number in {spec!r}, got {v!r}") from None
            if not lr > 0:
                raise MethodError(f"{flag}: option lr must be > 0 in {spec!r}, got {v!r}")
        else:
            opts.append((k, _option_value(flag, spec, name, k, v.strip(), valid)))
    from duogard.grad import estimator

    try:  # unknown names and bad option values fail here, with the valid ones
        built = estimator(name, **dict(opts))
    except (TypeError, ValueError) as exc:
        raise MethodError(f"{flag}: {exc}") from None
    return MethodSpec(name, tuple(opts), lr, built)


def parse_methods(text: str | None, *, flag: str = "--methods") -> list[MethodSpec]:
    """Semicolon-separated methods (None: :data:`DEFAULT_METHODS`)."""
    if text is None:
        return [parse_method(m, flag=flag) for m in DEFAULT_METHODS]
    items = [m for m in text.split(";") if m.strip()]
    if not items:
        raise MethodError(f"{flag}: expected one or more methods separated by ';', got {text!r}")
    return [parse_method(m, flag=flag) for m in items]
