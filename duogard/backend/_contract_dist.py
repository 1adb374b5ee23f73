"""The backend contract's data-parallel ops (a part of :class:`Backend`), and the launch
environment both backends read.

A data-parallel run is W processes (ranks), started by ``torchrun`` (or anything that sets the
same variables): ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. Each backend joins
its framework's own process group from them (:meth:`DistributedOps.dist_init`): torch's
``torch.distributed`` (gloo on CPU, NCCL on CUDA), JAX's ``jax.distributed`` (a coordinator at
``MASTER_ADDR`` on a port derived from ``MASTER_PORT``, gloo CPU collectives). Collectives are
the framework's own; duogard adds no transport of its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["DistributedOps", "LaunchEnv", "launch_env", "roll_call", "DistributedError"]

_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A data-parallel run cannot go on: a rank stopped, a collective timed out, or the ranks
    disagree (their parameters differ). The message names the ranks concerned.
    """


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in a data-parallel launch (from the environment)."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    #: ``torchrun --max-restarts``: how many times the group was restarted (0 on the first run)
    restart_count: int = 0


def launch_env(what: str = "distributed") -> LaunchEnv:
    """The launch variables of this process, checked.

    Raises:
        DistributedError: a variable is missing or malformed; the message names it and says how
            to launch (``torchrun --nproc-per-node N ...``).
    """
    missing = [v for v in _VARS if not os.environ.get(v)]
    if missing:
        raise DistributedError(
            f"{what}: the environment variables {', '.join(missing)} are not set; a data-parallel "
            "run needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, as torchrun sets them: "
            "torchrun --nproc-per-node 2 -m duogard train ... (or call fit without distributed=)"
        )
    values = {}
    for v in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        text = os.environ[v]
        try:
            values[v] = int(text)
        except ValueError:
            raise DistributedError(f"{what}: ${v} must be an integer, got {text!r}") from None
    rank, world, port = values["RANK"], values["WORLD_SIZE"], values["MASTER_PORT"]
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(
            f"{what}: expected 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}"
        )
    if not 0 < port < 65536:
        raise DistributedError(f"{what}: $MASTER_PORT must be a TCP port (1-65535), got {port}")
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return LaunchEnv(rank, world, os.environ["MASTER_ADDR"], port, int(restarts) if restarts.isdigit() else 0)


class DistributedOps(Protocol):
    """Data-parallel ops: join the process group, run a step on every rank, reduce inside it."""

    def dist_init(self, timeout: float = 300.0) -> tuple[int, int]:
        """Join the framework's process group from the launch environment (:func:`launch_env`).

        Idempotent: a second call returns the group already joined. torch: ``init_process_group``
        with gloo (NCCL when the default device is CUDA) and ``timeout`` for every collective.
        JAX: ``jax.distributed.initialize`` with the coordinator at ``MASTER_ADDR:MASTER_PORT+1``
        (``$DUOGARD_JAX_COORDINATOR_PORT`` overrides the port), gloo CPU collectives bounded by
        ``timeout``, and the coordination service set up so that a rank that stops is duogard's
        error on the others, not JAX's abort (see ``duogard_jax._distributed``); it must run
        before JAX makes any array. A rank whose peers do not all join within ``timeout`` fails
        (JAX: says so and exits 1, before JAX's own deadline would abort the process).

        Args:
            timeout: seconds the join, and each collective, may wait for a peer before the run
                fails instead of hanging.

        Returns:
            ``(rank, world_size)``.

        Raises:
            DistributedError: the launch variables are missing or malformed, or the group cannot
                be joined (JAX: arrays were made before).
        """

    def dist_world(self) -> tuple[int, int]:
        """``(rank, world_size)`` of the joined process group; ``(0, 1)`` when none was joined."""

    def dist_step(self, fn: Callable, sharded: Sequence[Any] = ()) -> Callable:
        """``fn`` made into one data-parallel program run by every rank.

        Each rank calls the result with its own arguments; ``fn`` sees them as they are (its
        rank's shard of a split argument, the whole of a replicated one) and may call
        :meth:`all_reduce_sum` and :meth:`all_gather`. Every output must be the same on every
        rank (computed from reduced values and replicated arguments). torch: ``fn`` itself (the
        collectives run eagerly). JAX: ``jit(shard_map(fn))`` over a mesh of one device per
        process, the arguments wrapped as global arrays without a copy, the outputs returned as
        this process's arrays.

        Args:
            fn: the per-rank program.
            sharded: one entry per positional argument: True (the argument is this rank's
                shard of an array split along its first axis, the same shape on every rank),
                False (the same on every rank), or a tuple of those for a tuple argument.
                Missing entries mean False.
        """

    def all_reduce_sum(self, x: Any) -> Any:
        """The elementwise sum of ``x`` over the ranks, the same bits on every rank; only inside
        a :meth:`dist_step` program (torch: anywhere in a joined group).
        """

    def all_gather(self, x: Any) -> Any:
        """Every rank's ``x`` stacked along a new first axis (rank order); only inside a
        :meth:`dist_step` program (torch: anywhere in a joined group).
        """

    def host_all_gather(self, x: Any) -> Any:
        """:meth:`all_gather` of a NumPy array outside any step (e.g. the ranks' parameter
        hashes), as a NumPy array of shape ``(world_size, *x.shape)``.
        """

    def dist_roll_call(self, tag: str, wait: float = 10.0) -> list[int] | None:
        """The ranks that answer the roll call ``tag`` within ``wait`` seconds, this one included.

        Each rank that calls it marks itself present under ``tag`` in the launch's key-value
        store (torch: the process group's store, torchrun's agent store; JAX: the coordination
        service's), then waits until every rank is there or ``wait`` runs out. After a failed
        collective the ranks that never answer are the ones that stopped (or still hang): what
        a data-parallel run names in its error. None where no store can be reached (no group
        joined, or the store went with a dead rank).
        """

    def dist_shutdown(self) -> None:
        """Leave the process group (nothing when none was joined). JAX: after a run that went
        well the ranks leave together (a barrier, bounded by the join's timeout), and rank 0,
        which hosts the coordination service, leaves last; it also runs at exit.
        """

    def is_collective_failure(self, exc: BaseException) -> bool:
        """Whether ``exc``, raised in a data-parallel step, is this framework's report of a failed
        collective (a peer gone, a timeout, a broken connection) rather than an error of the
        model; a data-parallel run then names the ranks that stopped.
        """


def roll_call(set_key: Callable[[str], None], has_key: Callable[[str], bool], tag: str, rank: int,
              world: int, wait: float, *, poll: float = 0.05) -> list[int]:  # fmt: skip
    """The roll call of :meth:`DistributedOps.dist_roll_call` on any key-value store:
    ``set_key(k)`` marks a key present, ``has_key(k)`` says whether it is. Returns the sorted
    ranks present when all are, or when ``wait`` seconds have passed.
    """
    import time

    prefix = f"duogard/roll-call/{tag}/"
    set_key(prefix + str(rank))
    deadline = time.monotonic() + max(float(wait), 0.0)
    while True:
        present = [r for r in range(world) if r == rank or has_key(prefix + str(r))]
        if len(present) == world or time.monotonic() >= deadline:
            return present
        time.sleep(poll)
