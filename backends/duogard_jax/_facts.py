"""What the front end asks about JAX instead of naming it (see :class:`duogard.backend.Backend`)."""

from __future__ import annotations

import jax

from duogard.backend.authoring import NO_FORWARD_RULE, match_cause

# JAX's forward-mode failures, most specific first (the generic "jvp" also appears in others)
_CAUSES = (
    (
        "custom_vjp",
        "the loss uses a jax.custom_vjp function, which has no forward-mode rule "
        "(define it with jax.custom_jvp instead)",
    ),
    *NO_FORWARD_RULE,
)


def gpu_preallocation_fixed() -> bool:
    from jax._src import xla_bridge  # private: JAX has no public "have the backends started?"

    backends = getattr(xla_bridge, "_backends", None)
    return True if backends is None else bool(backends)  # unknown internals: assume started


def forward_mode_cause(exc: BaseException) -> str | None:
    return match_cause(exc, _CAUSES)


def exchange_device(device):
    if not isinstance(device, jax.Device):
        return None
    kind = {"gpu": "cuda", "rocm": "cuda"}.get(device.platform, device.platform)
    if kind == "cpu":
        from ._dlpack import cpu_index  # the exchange numbers JAX's CPU devices itself

        index = cpu_index(device)
        return None if index is None else ("cpu", index)
    if kind == "cuda":
        index = getattr(device, "local_hardware_id", None)  # None on older jaxlib
        return "cuda", int(device.id if index is None else index)
    return None
