"""The one warning of a renamed public name (kept as an alias for one release)."""

from __future__ import annotations

import warnings


def moved(old: str, new: str, value, note: str = ""):
    """``value`` (the new name's object), after a DeprecationWarning that ``old`` goes in the next
    release and ``new`` replaces it; for a module's ``__getattr__`` (the warning points at its caller).
    """
    warnings.warn(
        f"{old} is deprecated and goes in the next release: use {new}" + (f" ({note})" if note else ""),
        DeprecationWarning,
        stacklevel=3,
    )
    return value
