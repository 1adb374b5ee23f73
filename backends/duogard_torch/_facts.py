"""What the front end asks about PyTorch instead of naming it (see :class:`duogard.backend.Backend`)."""

from __future__ import annotations

import torch

from duogard.backend.authoring import NO_FORWARD_RULE, match_cause

_IN_PLACE = (
    "the loss mutates a tensor in place (e.g. BatchNorm in training mode updates its "
    "running statistics); pass buffers explicitly or use eval mode"
)
# PyTorch's forward-mode failures, most specific first (the generic "jvp" also appears in others)
_CAUSES = (
    (
        "setup_context",
        "the loss uses a torch.autograd.Function without forward-mode support "
        "(it needs setup_context and a jvp staticmethod)",
    ),
    (
        "custom autograd.function",
        "the loss uses a torch.autograd.Function without a jvp staticmethod (forward mode needs one)",
    ),
    (
        "does not have vmap support",
        "the loss uses a torch.autograd.Function without vmap support, which "
        "batched JVPs (num_tangents > 1, forward-exact) need (set "
        "generate_vmap_rule=True; forward mode also needs a jvp staticmethod)",
    ),
    ("in-place", _IN_PLACE),
    ("inplace", _IN_PLACE),
    *NO_FORWARD_RULE,
)


def gpu_preallocation_fixed() -> bool:
    return False  # the caching allocator takes GPU memory on demand: nothing is preallocated


def forward_mode_cause(exc: BaseException) -> str | None:
    return match_cause(exc, _CAUSES)


def exchange_device(device):
    if not isinstance(device, torch.device):
        return None
    if device.type == "cpu":
        return "cpu", 0
    if device.type == "cuda":  # ROCm builds call their GPUs cuda too
        return "cuda", int(device.index or 0)
    return None
