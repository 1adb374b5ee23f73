"""The backend contract's framework facts (a part of :class:`Backend`): what the front end asks a
backend instead of naming its framework, matching its error messages or reading its private
attributes, so a third backend needs no change in the front end.
"""

from __future__ import annotations

from typing import Any, Protocol

from duogard.backend._exchange import Device

__all__ = ["FrameworkFacts"]


class FrameworkFacts(Protocol):
    """Facts about a framework that only its backend knows (and :attr:`Backend.float64_always`)."""

    def gpu_preallocation_fixed(self) -> bool:
        """Whether this process's GPU memory preallocation is already decided: the framework reads
        its setting once, when its runtime starts, and has started it (JAX reads
        ``XLA_PYTHON_CLIENT_PREALLOCATE`` when it creates its backends, at the first device query
        or computation). False for a framework that preallocates nothing (PyTorch).
        """

    def forward_mode_cause(self, exc: BaseException) -> str | None:
        """Why forward mode failed, when ``exc`` is this framework's way of saying so: a phrase for
        the user (``"the loss uses a jax.custom_vjp function, which has no forward-mode rule
        (define it with jax.custom_jvp instead)"``), else None (``exc`` is another error, left as
        it is). :func:`duogard.grad.forward_mode_errors` turns it into a ``ForwardModeError``.
        """

    def exchange_device(self, device: Any) -> Device | None:
        """``device``, one of this framework's device objects (a ``torch.device``, a JAX
        ``Device``), as the exchange names it: ``("cpu", index)`` (0 unless the framework tells
        CPU devices apart: :attr:`Backend.one_host_device`) or ``("cuda", index)``. None for
        anything else, and for a device of this framework that is neither a CPU nor a CUDA/ROCm
        GPU (the caller says what it takes).
        """
