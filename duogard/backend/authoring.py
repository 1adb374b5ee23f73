"""What backend authors use beside the contract (:class:`duogard.backend.Backend`).

A backend module implements the contract; these helpers give every backend the same argument
checks and the same error messages, so a third backend gives them too. Users of duogard need
none of them.

- the DLPack exchange: :class:`ExportedArray`, :data:`Device`, :func:`device_spec`,
  :func:`device_label`, :func:`plan_move`, :func:`copy_refused`, :func:`leaf_name`,
  :func:`native_byte_order`;
- random draws: :data:`GENERATORS`, :func:`check_generator`, :func:`check_draw_rows`;
- threads: :func:`threads_from_env`, :data:`MAX_THREADS`;
- data-parallel runs: :func:`launch_env`, :class:`LaunchEnv`, :func:`roll_call`,
  :class:`DistributedError`;
- forward-mode failures: :func:`match_cause`, with the causes both frameworks share
  (:data:`NO_FORWARD_RULE`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from duogard.backend._contract_dist import DistributedError, LaunchEnv, launch_env, roll_call
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
    "Device",
    "SHARE_ALIGNMENT",
    "ExportedArray",
    "device_spec",
    "device_label",
    "plan_move",
    "copy_refused",
    "leaf_name",
    "native_byte_order",
    "GENERATORS",
    "check_generator",
    "check_draw_rows",
    "MAX_THREADS",
    "threads_from_env",
    "DistributedError",
    "LaunchEnv",
    "launch_env",
    "roll_call",
    "NO_FORWARD_RULE",
    "match_cause",
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


#: Words of a framework's error that say forward mode met an op without a rule, and what that
#: means; a backend's table of causes ends with these (the generic "jvp" appears in other
#: messages too, so more specific causes come first).
NO_FORWARD_RULE: tuple[tuple[str, str], ...] = tuple(
    (words, "an op in the loss has no forward-mode (JVP) rule")
    for words in ("forward-mode", "forward ad", "forward_ad", "jvp")
)


def match_cause(exc: BaseException, causes: Sequence[tuple[str, str]]) -> str | None:
    """:meth:`Backend.forward_mode_cause` from a table: the cause of the first ``(words, cause)``
    whose words appear in ``exc``'s message (lower case), for the error types frameworks raise
    when forward mode cannot go through (RuntimeError, TypeError, NotImplementedError); else None.
    """
    if not isinstance(exc, (RuntimeError, TypeError, NotImplementedError)):
        return None
    text = str(exc).lower()
    return next((cause for words, cause in causes if words in text), None)
