"""Data-parallel ops on JAX's multi-process runtime (see :class:`duogard.backend.Backend`).

``jax.distributed.initialize`` joins the processes (the coordinator at ``MASTER_ADDR`` on
``MASTER_PORT + 1``: torchrun's own store holds ``MASTER_PORT``), with gloo CPU collectives. A
data-parallel step is one SPMD program, ``jit(shard_map(fn))`` over a mesh of one device per
process: ``psum`` / ``all_gather`` over the mesh axis are XLA's collectives. Arguments enter as
global arrays that wrap this process's buffers (no copy, nothing sent); the outputs, the same on
every rank, come back as this process's arrays, so everything outside the step (evaluation,
checkpoints) stays process-local.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from duogard.backend.authoring import DistributedError, launch_env, roll_call

#: the mesh axis of the ranks (the name psum and all_gather reduce over)
AXIS = "duogard_ranks"


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
    seconds = max(int(timeout), 1)
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"{env.master_addr}:{port}",
            num_processes=env.world_size,
            process_id=env.rank,
            initialization_timeout=seconds,
            heartbeat_timeout_seconds=max(seconds, 2),
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
            f"{env.master_addr}:{port}: {first}{hint}"
        ) from exc
    return dist_world()


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
        except jax.errors.JaxRuntimeError as exc:
            text = str(exc)
            if not any(w in text.lower() for w in ("gloo", "connection", "peer", "timed out", "heartbeat")):
                raise
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


def host_all_gather(x):
    a = np.ascontiguousarray(np.asarray(x))
    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        return a[None].copy()
    from jax.experimental import multihost_utils

    raw = a.reshape(-1).view(np.uint8)  # bytes: any dtype, whatever the 64-bit mode
    out = np.asarray(multihost_utils.process_allgather(raw))
    return out.view(a.dtype).reshape((out.shape[0], *a.shape))


def dist_shutdown() -> None:
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


# what XLA's collectives say when a peer is gone (dist_step reports most as DistributedError)
_COLLECTIVE_WORDS = ("gloo", "connection", "peer", "timed out", "timeout", "heartbeat", "collective")


def is_collective_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, RuntimeError) and any(w in text for w in _COLLECTIVE_WORDS)
