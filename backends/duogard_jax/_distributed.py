"""Data-parallel ops on JAX's multi-process runtime (see :class:`duogard.backend.Backend`).

``jax.distributed.initialize`` joins the processes (the coordinator at ``MASTER_ADDR`` on
``MASTER_PORT + 1``: torchrun's own store holds ``MASTER_PORT``), with gloo CPU collectives. A
data-parallel step is one SPMD program, ``jit(shard_map(fn))`` over a mesh of one device per
process: ``psum`` / ``all_gather`` over the mesh axis are XLA's collectives. Arguments enter as
global arrays that wrap this process's buffers (no copy, nothing sent); the outputs, the same on
every rank, come back as this process's arrays, so everything outside the step (evaluation,
checkpoints) stays process-local.

A rank that stops must make the others fail through duogard (a checkpoint, the rank named), not
through JAX's coordination service, which aborts a process (SIGABRT, a C++ stack) on any error it
polls: a peer's missed heartbeats, a failed shutdown barrier, a registration past its deadline.
So the join's ``timeout`` bounds the collectives themselves (XLA's
``--xla_cpu_collective_timeout_seconds``, set in ``$XLA_FLAGS`` before XLA starts); the service runs in
JAX's recoverable mode (``jax_enable_recoverability``: a task that fails is not every task's
fatal error), with a heartbeat timeout past the collectives'; leaving is a barrier with that
timeout, and rank 0, which hosts the service, keeps it until the others have left; and a rank
the others wait for in vain at the join is reported by duogard and the process exits 1 before
JAX's own deadline would abort it. What stays out of reach (jaxlib 0.10: its abort callback
cannot be replaced from Python): when rank 0 itself dies or freezes, the service goes with it
and JAX aborts every other rank.
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from duogard.backend.authoring import DistributedError, launch_env, roll_call

#: the mesh axis of the ranks (the name psum and all_gather reduce over)
AXIS = "duogard_ranks"

# The joined run: its timeout (seconds, for collectives and the leaving barrier), whether a
# collective failed (then no rank waits at the barrier for the others), whether it has left.
_RUN = {"timeout": 300.0, "failed": False, "left": False}


def dist_init(timeout: float = 300.0) -> tuple[int, int]:
    if jax.distributed.is_initialized():
        return dist_world()
    env = launch_env("jax dist_init")
    if not 0 < timeout < float("inf"):  # inf overflows the frameworks' timeouts
        raise DistributedError(f"jax dist_init: timeout must be finite positive seconds, got {timeout!r}")
    text = os.environ.get("DUOGARD_JAX_COORDINATOR_PORT")
    port = int(text) if text and text.isdigit() else env.master_port + 1
    if not 0 < port < 65536:
        raise DistributedError(
            f"jax dist_init: the coordinator port (MASTER_PORT + 1 = {port}) is not a TCP port; set "
            "$DUOGARD_JAX_COORDINATOR_PORT"
        )
    seconds = max(math.ceil(timeout), 1)
    where = f"{env.master_addr}:{port}"
    # JAX aborts a process whose join outlives its initialization_timeout: duogard's watchdog,
    # at the timeout, says why and exits first
    watchdog = threading.Timer(float(timeout), _never_joined, (env.rank, env.world_size, where, timeout))
    watchdog.daemon = True
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.config.update("jax_enable_recoverability", True)
        # JAX's preemption service takes SIGTERM from Python (its own handler, in C++): duogard's
        # (a checkpoint after the step, exit 143) would never run
        jax.config.update("jax_enable_preemption_service", False)
        _bound_cpu_collectives(seconds)
        watchdog.start()
        jax.distributed.initialize(
            coordinator_address=where,
            num_processes=env.world_size,
            process_id=env.rank,
            initialization_timeout=seconds + _GRACE,
            # past the collectives' timeout: a frozen peer is duogard's error first
            heartbeat_timeout_seconds=2 * seconds + _GRACE,
            shutdown_timeout_seconds=seconds,
        )
    except (RuntimeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = (
            " (call it before JAX makes any array: fit(distributed=True) does so before init_state)"
            if "before" in first.lower()
            else ""
        )
        raise DistributedError(
            f"jax dist_init: rank {env.rank} of {env.world_size} could not join the coordinator at "
            f"{where} within {timeout:g} s (DataParallel(timeout=...), --dist-timeout): {first}{hint}"
        ) from exc
    finally:
        watchdog.cancel()
    _RUN.update(timeout=float(timeout), failed=False, left=False)
    _GATHER.clear()  # a program of an earlier group's mesh
    # before JAX's own exit hook (atexit runs the last registered first): leave in order
    atexit.register(dist_shutdown)
    return dist_world()


#: seconds JAX's own deadlines wait past duogard's timeout (duogard reports first)
_GRACE = 10


def _bound_cpu_collectives(seconds: int) -> None:
    """Bound XLA's CPU collectives by ``seconds`` (XLA waits 30 minutes for a peer by default):
    ``--xla_cpu_collective_timeout_seconds`` in ``$XLA_FLAGS``, which XLA reads when its CPU
    client starts (after the join; a program's compiler options do not reach the collectives).
    A value the user set stays.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_collective_timeout_seconds" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_collective_timeout_seconds={seconds}".strip()


def _never_joined(rank: int, world: int, where: str, timeout: float) -> None:
    """The join's watchdog: the ranks did not all join in ``timeout`` seconds. JAX would abort
    the process (SIGABRT, a C++ stack) at its own deadline; this says why and exits 1 first.
    """
    sys.stderr.write(
        f"duogard: jax dist_init: rank {rank} of {world} could not join the coordinator at {where} "
        f"within {timeout:g} s (DataParallel(timeout=...), --dist-timeout): not all {world} ranks "
        "joined (one did not start, or is stuck before joining); exit 1 (JAX would abort the "
        "process)\n"
    )
    sys.stderr.flush()
    os._exit(1)


def dist_roll_call(tag: str, wait: float = 10.0):
    if not jax.distributed.is_initialized():
        return None
    from jax._src.distributed import global_state  # the coordination service's key-value store

    client = global_state.client
    if client is None:
        return None

    def has(key):
        try:
            client.key_value_try_get(key)
        except Exception:  # NOT_FOUND (or the service is gone: the roll call then says so)
            return False
        return True

    rank, world = dist_world()
    try:
        return roll_call(lambda k: client.key_value_set(k, "1"), has, tag, rank, world, wait)
    except Exception:  # the coordination service went with rank 0
        return None


def dist_world() -> tuple[int, int]:
    if not jax.distributed.is_initialized():
        return 0, 1
    return jax.process_index(), jax.process_count()


def _mesh() -> Mesh:
    """One device per process, in process order (this process's first local device for its own)."""
    firsts: dict = {}
    for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        firsts.setdefault(d.process_index, d)
    return Mesh(np.array([firsts[p] for p in sorted(firsts)]), (AXIS,))


def _flags(flag, arg):
    """The shard_map spec prefix for one argument: P(AXIS) split, P() replicated."""
    if isinstance(flag, tuple):
        return tuple(_flags(f, a) for f, a in zip(flag, arg))
    return P(AXIS) if flag else P()


def _global(mesh: Mesh, arg, spec):
    """This process's pytree ``arg`` as global arrays of ``spec`` (sharded specs only on arrays)."""
    if isinstance(spec, tuple):
        return tuple(_global(mesh, a, s) for a, s in zip(arg, spec))
    device = mesh.devices[jax.process_index()] if mesh.devices.size > 1 else mesh.devices[0]
    world = mesh.devices.size
    sharding = NamedSharding(mesh, spec)

    def leaf(x):
        x = x if isinstance(x, jax.Array) else jnp.asarray(x)
        if x.devices() != {device}:
            x = jax.device_put(x, device)
        shape = (x.shape[0] * world, *x.shape[1:]) if spec != P() else x.shape
        return jax.make_array_from_single_device_arrays(shape, sharding, [x])

    return jax.tree_util.tree_map(leaf, arg)


def dist_step(fn, sharded=()):
    mesh = _mesh()
    programs: dict = {}

    def run(*args):
        flags = tuple(sharded[i] if i < len(sharded) else False for i in range(len(args)))
        specs = tuple(_flags(f, a) for f, a in zip(flags, args))
        program = programs.get(specs)
        if program is None:
            mapped = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)
            program = programs[specs] = jax.jit(mapped)
        try:
            # wait here: a failed collective surfaces in the step (not at a later read of a value)
            out = jax.block_until_ready(program(*(_global(mesh, a, s) for a, s in zip(args, specs))))
        except (jax.errors.JaxRuntimeError, ValueError) as exc:
            text = str(exc)
            if not (any(w in text.lower() for w in _STEP_WORDS) and _from_collectives(exc)):
                raise
            _RUN["failed"] = True
            raise DistributedError(
                f"jax: the data-parallel step's collective failed on rank {jax.process_index()}: "
                f"{text.strip().splitlines()[0][:300]}"
            ) from exc
        # the outputs are replicated: this process's copy, as an ordinary single-device array
        return jax.tree_util.tree_map(lambda a: a.addressable_data(0), out)

    run.compile_count = lambda: sum(p._cache_size() for p in programs.values())
    return run


def all_reduce_sum(x):
    return jax.lax.psum(x, AXIS)


def all_gather(x):
    return jax.lax.all_gather(x, AXIS)


_GATHER: list = []  # host_all_gather's program, built on first use


def host_all_gather(x):
    a = np.ascontiguousarray(np.asarray(x))
    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        return a[None].copy()
    if not _GATHER:  # a data-parallel program like the step's: the same timeout on its collective
        _GATHER.append(dist_step(lambda b: jax.lax.all_gather(b, AXIS), sharded=(True,)))
    raw = a.reshape(-1).view(np.uint8)  # bytes: any dtype, whatever the 64-bit mode
    out = np.asarray(_GATHER[0](raw))
    return out.view(a.dtype).reshape((out.shape[0], *a.shape))


def dist_shutdown() -> None:
    if not jax.distributed.is_initialized() or _RUN["left"]:
        return
    _RUN["left"] = True
    from jax._src.distributed import global_state  # the coordination service's client

    client, (rank, world) = global_state.client, dist_world()
    timeout_ms = max(int(_RUN["timeout"] * 1000), 1000)
    if client is not None and world > 1:
        # JAX's recoverable mode leaves without a barrier: a rank 0 that left first would take
        # the service away from ranks still working, and JAX aborts them. A run that went well
        # meets at one; after a failed collective no rank waits for the others.
        if not _RUN["failed"]:
            try:
                client.wait_at_barrier("duogard/leave", timeout_ms)
            except Exception:  # noqa: BLE001 - a peer is gone: leave anyway
                _RUN["failed"] = True
        # rank 0 keeps the service until the others have left; after a failure, not for the one
        # peer of two, which is the rank that failed (stalled, or gone)
        if rank == 0 and not (_RUN["failed"] and world == 2):
            _outlive(client, world, timeout_ms / 1000 if not _RUN["failed"] else min(_RUN["timeout"], 10.0))
    jax.distributed.shutdown()


def _outlive(client, world: int, seconds: float) -> None:
    """Rank 0 hosts the coordination service: wait (at most ``seconds``) until the other live
    ranks have left it (``get_live_nodes`` returns when each live task has asked it or left).
    """
    done = threading.Event()

    def ask():
        try:
            client.get_live_nodes(list(range(world)))
        except Exception:  # noqa: BLE001 - the service cannot say: stop waiting
            pass
        done.set()

    threading.Thread(target=ask, daemon=True).start()
    done.wait(seconds)


# what a failed collective of a step says (a stalled peer: "timed out"), and what XLA's
# collectives say when a peer is gone (dist_step reports most as DistributedError)
_STEP_WORDS = ("gloo", "connection", "peer", "timed out", "heartbeat")
_COLLECTIVE_WORDS = ("gloo", "connection", "peer", "timed out", "timeout", "heartbeat", "collective")


def _from_collectives(exc: BaseException) -> bool:
    """Whether ``exc`` can be a collective's report: jaxlib raises a failed gloo collective as a
    ValueError ("UNKNOWN: Gloo all-reduce failed: ..."), other runtime failures as RuntimeErrors.
    """
    return isinstance(exc, RuntimeError) or (isinstance(exc, ValueError) and "gloo" in str(exc).lower())


def is_collective_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return _from_collectives(exc) and any(w in text for w in _COLLECTIVE_WORDS)
