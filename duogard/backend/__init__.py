"""Backend contract, registry and selection.

A backend is a module (``duogard_jax``, ``duogard_torch``, or a third party's) that implements
the :class:`Backend` protocol: the public names listed in :data:`CONTRACT`, each op with the
signature and the meaning written there once. Backends register themselves as entry points in
the group ``duogard.backends``, by convention under their framework's import name (``jax``,
``torch``); this module discovers them without importing any framework until a backend is
actually asked for.

Selection order: explicit argument > :func:`use_backend` context > ``$DUOGARD_BACKEND`` >
default (jax if installed, else torch). This is the one place in the front end that
chooses between backends by name.

The module also holds what the backends share: the object of the DLPack exchange
(:class:`ExportedArray`) and the argument checks and error messages both backends give
(:func:`check_draw_rows`, :func:`device_spec`, :func:`plan_move`, :func:`copy_refused`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.metadata
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

from duogard.backend._contract import CONTRACT, Backend
from duogard.backend._exchange import (
    GENERATORS,
    SHARE_ALIGNMENT,
    Device,
    ExportedArray,
    check_draw_rows,
    check_generator,
    copy_refused,
    device_label,
    device_spec,
    leaf_name,
    native_byte_order,
    plan_move,
)

__all__ = [
    "CONTRACT",
    "Backend",
    "BackendInfo",
    "Device",
    "ExportedArray",
    "available_backends",
    "backend",
    "backend_of",
    "GENERATORS",
    "SHARE_ALIGNMENT",
    "check_draw_rows",
    "check_generator",
    "copy_refused",
    "device_label",
    "device_spec",
    "extra",
    "leaf_name",
    "native_byte_order",
    "plan_move",
    "registered_backends",
    "threads_from_env",
    "use_backend",
]

#: The most threads an environment variable may ask for (torch crashed on 100000).
MAX_THREADS = 1024


def threads_from_env(variable: str) -> int | None:
    """The thread count that environment variable ``variable`` forces (None: unset or blank).

    A positive int, at most :data:`MAX_THREADS` (1024: far past any CPU count where more
    threads help, and far below the counts that crashed torch).

    Raises:
        ValueError: anything else, naming the variable, what it must be and what it holds.
    """
    text = os.environ.get(variable, "").strip()
    if not text:
        return None
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or not 1 <= n <= MAX_THREADS:
        raise ValueError(f"${variable} must be a positive int of at most {MAX_THREADS} threads, got {text!r}")
    return n


_ENTRY_POINT_GROUP = "duogard.backends"
_BUILTIN = {"jax": "duogard_jax", "torch": "duogard_torch"}
_DEFAULT_ORDER = ("jax", "torch")
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("duogard_backend", default=None)
_loaded: dict[str, ModuleType] = {}


@dataclass(frozen=True)
class BackendInfo:
    """One registered backend: whether it can be used, its framework version, or why not."""

    name: str
    module: str
    available: bool
    version: str | None
    reason: str | None

    def __str__(self) -> str:
        if self.available:
            return f"{self.name}: available ({self.module}, framework {self.version})"
        return f"{self.name}: unavailable ({self.reason})"


@functools.cache
def _registry() -> dict[str, str]:
    """Backend name -> module path, from entry points, falling back to the built-ins (a source checkout).

    Read once per process (callers must not change the dict).
    """
    found = dict(_BUILTIN)
    try:
        for ep in importlib.metadata.entry_points(group=_ENTRY_POINT_GROUP):
            found[ep.name] = ep.value.split(":")[0]
    except Exception:  # pragma: no cover - broken metadata must not break import
        pass
    return found


def registered_backends() -> tuple[str, ...]:
    """The names of the registered backends, importing none of them."""
    return tuple(_registry())


def _load(name: str) -> ModuleType:
    if name in _loaded:
        return _loaded[name]
    registry = _registry()
    if name not in registry:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {sorted(registry)}")
    module = importlib.import_module(registry[name])  # raises ImportError with install hint
    missing = [n for n in CONTRACT if not hasattr(module, n)]
    if missing:
        raise TypeError(f"backend {name!r} ({registry[name]}) lacks contract names {missing}")
    _loaded[name] = module
    return module


def available_backends() -> list[BackendInfo]:
    """List every registered backend with its framework version, or why it is unavailable."""
    out = []
    for name, mod in sorted(_registry().items()):
        try:
            be = _load(name)
            out.append(BackendInfo(name, mod, True, be.framework_version(), None))
        except ImportError as exc:
            out.append(BackendInfo(name, mod, False, None, str(exc)))
    return out


def _default_name() -> str:
    for name in _DEFAULT_ORDER:
        try:
            _load(name)
            return name
        except ImportError:
            continue
    raise ImportError(
        'duogard: no backend is installed. Install one: pip install "duogard[jax]" or '
        'pip install torch==2.13.0 "duogard[torch]" (CPU wheel first)'
    )


def backend(name: str | ModuleType | None = None) -> ModuleType:
    """Return a backend module.

    ``name`` may be ``"jax"``, ``"torch"``, another registered name, a backend module
    (returned as is), or None: then the :func:`use_backend` context, then
    ``$DUOGARD_BACKEND``, then the default (jax if installed, else torch).

    Raises ValueError for an unknown name (listing the known ones) and ImportError, with
    the command that installs it, for a known backend whose framework is missing.
    """
    if isinstance(name, ModuleType):
        return name
    if name is None:
        name = _current.get() or os.environ.get("DUOGARD_BACKEND") or None
        if name is None:
            name = _default_name()
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a backend name (str) or module, got {type(name).__name__}")
    return _load(name.strip().lower())


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[ModuleType]:
    """Context manager: ``with duogard.use_backend("torch"): ...`` selects the default backend."""
    be = backend(name)
    token = _current.set(be.name)
    try:
        yield be
    finally:
        _current.reset(token)


def backend_of(x, default: str | ModuleType | None = None, *, fallback: bool = True) -> ModuleType | None:
    """The backend that owns array ``x`` (a jax array or tracer, a torch tensor).

    The loaded backends are asked first (:meth:`Backend.is_array`). A registered backend that
    is not loaded yet is loaded and asked only when its framework is already imported: backends
    are registered under their framework's import name, and no array of a framework that was
    never imported can exist. So this imports no framework of its own accord.

    Args:
        x: any value.
        default: the backend for values no backend owns (NumPy arrays, Python scalars):
            a name or module, or None for the selected backend (see :func:`backend`).
        fallback: False returns None for such values instead.

    Returns:
        A backend module (or None, only with ``fallback=False``).
    """
    for be in tuple(_loaded.values()):
        if be.is_array(x):
            return be
    for name in _registry():
        if name not in _loaded and sys.modules.get(name) is not None:
            try:
                be = _load(name)
            except ImportError:  # the framework is there, the backend's other needs are not
                continue
            if be.is_array(x):
                return be
    return backend(default) if fallback else None


def extra(name: str, attr: str):
    """A framework-specific extra of backend ``name``: ``extra("torch", "forward_grad_")``.

    Extras are what only one framework can offer (the ``torch.nn.Module`` port, the
    ``torch.optim`` and optax adapters). A backend package ships them in its optional
    submodule ``extras`` (``duogard_torch.extras``); this loads the backend (which imports its
    framework), then that module, and returns the attribute. Public front-end names such as
    ``duogard.torch.forward_grad_`` and ``duogard.optim.from_optax`` resolve through here, so
    the front end never imports a framework itself.

    Args:
        name: a registered backend name (``"jax"``, ``"torch"``).
        attr: the extra's name.

    Returns:
        The attribute of ``<backend package>.extras``.

    Raises:
        ImportError: the backend's framework is not installed (the message says how to
            install it).
        AttributeError: the backend offers no such extra (the message lists those it has).
    """
    module = _load(name)
    try:
        extras = importlib.import_module(module.__name__ + ".extras")
    except ModuleNotFoundError as exc:
        if exc.name != module.__name__ + ".extras":
            raise
        raise AttributeError(
            f"backend {name!r} offers no extras (no module {module.__name__}.extras); "
            f"{attr!r} is not available"
        ) from None
    if not hasattr(extras, attr):
        offered = sorted(getattr(extras, "__all__", [n for n in vars(extras) if not n.startswith("_")]))
        raise AttributeError(f"backend {name!r} has no extra {attr!r}; it offers {offered}")
    return getattr(extras, attr)
