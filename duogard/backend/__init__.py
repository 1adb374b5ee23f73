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

Backends also register the front-end names only their framework can offer (the
``torch.nn.Module`` port, the ``torch.optim`` and optax adapters) as entry points in the group
``duogard.extras``: the public name (``duogard.optim.from_optax``) -> the object
(``duogard_jax.extras:from_optax``). :func:`load_extra` imports one when it is first used, so
the front-end modules that show these names (``duogard.torch``, ``duogard.optim``,
``duogard.interop``) name no backend (:func:`extras_module`).

What backend authors share beside the contract (the DLPack exchange's checks and messages,
thread counts, launch variables) is in :mod:`duogard.backend.authoring`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.metadata
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

from duogard.backend._contract import CONTRACT, Backend
from duogard.backend._exchange import Device, ExportedArray

# Helpers for backend authors live in duogard.backend.authoring; these names stay importable from
# here (not in __all__) for code written before it existed.
from duogard.backend.authoring import (  # noqa: F401
    GENERATORS,
    MAX_THREADS,
    SHARE_ALIGNMENT,
    check_draw_rows,
    check_generator,
    copy_refused,
    device_label,
    device_spec,
    leaf_name,
    native_byte_order,
    plan_move,
    threads_from_env,
)

__all__ = [
    "CONTRACT",
    "Backend",
    "BackendInfo",
    "DEFAULT_PAIR",
    "Device",
    "ExportedArray",
    "available_backends",
    "backend",
    "backend_of",
    "extra",
    "extras_module",
    "imported_backends",
    "loaded_backends",
    "load_extra",
    "registered_backends",
    "registered_extras",
    "use_backend",
]

_ENTRY_POINT_GROUP = "duogard.backends"
_BUILTIN = {"jax": "duogard_jax", "torch": "duogard_torch"}
_DEFAULT_ORDER = ("jax", "torch")
#: The default pair of a cross-backend comparison (``duogard.parity.compare_backends``,
#: ``duogard parity``).
DEFAULT_PAIR = _DEFAULT_ORDER
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
    for be in loaded_backends():
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


def loaded_backends() -> tuple[ModuleType, ...]:
    """The backends loaded so far in this process; imports nothing."""
    return tuple(_loaded.values())


def imported_backends() -> tuple[ModuleType, ...]:
    """The backends of every framework this process has imported, loading those not loaded yet.

    Backends are registered under their framework's import name, so this imports no framework
    of its own accord: it is how the front end asks "whoever could own this" (a device object,
    a framework's exception) without naming a framework. A backend whose framework is imported
    but whose other needs are missing is left out.
    """
    for name in _registry():
        if name not in _loaded and sys.modules.get(name) is not None:
            with contextlib.suppress(ImportError):
                _load(name)
    return loaded_backends()


_EXTRAS_GROUP = "duogard.extras"
#: The built-in backends' extras, as their entry points in pyproject.toml register them (a test
#: checks the two agree): read too where no metadata is installed (a source checkout).
_BUILTIN_EXTRAS = {
    "duogard.from_torch": "duogard_torch.extras:from_torch",
    "duogard.to_torch": "duogard_torch.extras:to_torch",
    "duogard.interop.from_torch": "duogard_torch.extras:from_torch",
    "duogard.interop.to_torch": "duogard_torch.extras:to_torch",
    "duogard.interop.TorchModel": "duogard_torch.extras:TorchModel",
    "duogard.interop.UnsupportedTorchOpsError": "duogard_torch.extras:UnsupportedTorchOpsError",
    "duogard.optim.from_optax": "duogard_jax.extras:from_optax",
    "duogard.optim.from_torch_optimizer": "duogard_torch.extras:optimizer_from_torch",
    "duogard.optim.TorchOptimizerState": "duogard_torch.extras:TorchOptimizerState",
    "duogard.torch.forward_grad_": "duogard_torch.extras:forward_grad_",
    "duogard.torch.KeySequence": "duogard_torch.extras:KeySequence",
    "duogard.torch.from_torch": "duogard_torch.extras:from_torch",
    "duogard.torch.to_torch": "duogard_torch.extras:to_torch",
    "duogard.torch.TorchModel": "duogard_torch.extras:TorchModel",
}


@functools.cache
def registered_extras() -> dict[str, str]:
    """Every registered extra: public front-end name -> ``"module:attribute"``, importing nothing.

    From the entry points of the group ``duogard.extras``, falling back to the built-in backends'
    (a source checkout). Read once per process (callers must not change the dict).
    """
    found = dict(_BUILTIN_EXTRAS)
    try:
        for ep in importlib.metadata.entry_points(group=_EXTRAS_GROUP):
            found[ep.name] = ep.value
    except Exception:  # pragma: no cover - broken metadata must not break import
        pass
    return found


def load_extra(public: str):
    """The object registered as front-end name ``public`` (``"duogard.optim.from_optax"``).

    The backend that provides it is loaded first (importing its framework; its contract is
    checked), then the registered module.

    Raises:
        ImportError: the backend's framework is not installed (the message says how to
            install it).
        AttributeError: no backend registers ``public``.
    """
    target = registered_extras().get(public)
    if target is None:
        module, _, name = public.rpartition(".")
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    path, _, attr = target.partition(":")
    owners = [n for n, top in _registry().items() if top == path.split(".")[0]]
    for owner in owners:
        _load(owner)  # ImportError with the backend's install hint
    value = importlib.import_module(path)
    for part in attr.split("."):
        value = getattr(value, part)
    return value


def extras_module(module: str, namespace: dict) -> tuple[Callable, Callable]:
    """``__getattr__`` and ``__dir__`` for front-end module ``module`` (``"duogard.torch"``), whose
    framework-specific names are registered extras: each is loaded with :func:`load_extra` on
    first use and kept in ``namespace`` (the module's ``globals()``, with its ``__all__``);
    ``__dir__`` lists ``__all__`` and every extra registered for the module.
    """
    prefix = module + "."

    def module_getattr(name: str):
        value = load_extra(prefix + name)
        namespace[name] = value  # resolved once; later lookups are plain attribute reads
        return value

    def module_dir() -> list[str]:
        extras = {n[len(prefix) :] for n in registered_extras() if n.startswith(prefix)}
        return sorted(set(namespace["__all__"]) | {n for n in extras if "." not in n})

    return module_getattr, module_dir


def extra(name: str, attr: str):
    """A framework-specific extra of backend ``name``: ``extra("torch", "forward_grad_")``.

    Extras are what only one framework can offer (the ``torch.nn.Module`` port, the
    ``torch.optim`` and optax adapters). A backend package ships them in its optional
    submodule ``extras`` (``duogard_torch.extras``); this loads the backend (which imports its
    framework), then that module, and returns the attribute. The public front-end names
    (``duogard.torch.forward_grad_``, ``duogard.optim.from_optax``) resolve through the
    registered extras instead (:func:`load_extra`), which name no backend in the front end.

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
