"""Data-parallel ops on ``torch.distributed`` (see :class:`duogard.backend.Backend`).

The process group comes from the launch environment (``init_method="env://"``): gloo on CPU,
NCCL when the default device is CUDA. Collectives run eagerly, so a data-parallel step is the
step itself (:func:`dist_step` returns ``fn``).
"""

from __future__ import annotations

import datetime
import os

import numpy as np
import torch

from duogard.backend.authoring import DistributedError, launch_env, roll_call

from ._arrays import default_device


def _dist():
    import torch.distributed as dist

    if not dist.is_available():  # pragma: no cover - torch builds without distributed
        raise DistributedError("torch dist_init: this torch build has no torch.distributed")
    return dist


def _joined() -> bool:
    dist = _dist()
    return dist.is_initialized()


def dist_init(timeout: float = 300.0) -> tuple[int, int]:
    dist = _dist()
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    env = launch_env("torch dist_init")
    if not 0 < timeout < float("inf"):  # inf overflows the frameworks' timeouts
        raise DistributedError(f"torch dist_init: timeout must be finite positive seconds, got {timeout!r}")
    device = torch.device(default_device())
    group = "nccl" if device.type == "cuda" else "gloo"
    if group == "nccl":  # pragma: no cover - needs GPUs
        local = int(os.environ.get("LOCAL_RANK", env.rank))
        torch.cuda.set_device(local % torch.cuda.device_count())
    seconds = datetime.timedelta(seconds=float(timeout))
    try:
        store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=seconds))
        # torchrun --max-restarts keeps its store across restarts: each attempt gets its own keys,
        # else the new processes read the dead ones' addresses
        store = dist.PrefixStore(f"duogard/attempt-{env.restart_count}", store)
        dist.init_process_group(group, store=store, rank=env.rank, world_size=env.world_size, timeout=seconds)
        _STORE[:] = [store]  # the roll call's store (torchrun's agent store outlives any rank)
    except (RuntimeError, ValueError) as exc:  # DistStoreError, DistNetworkError are RuntimeErrors
        raise DistributedError(
            f"torch dist_init: rank {env.rank} of {env.world_size} could not join the {group} "
            f"process group at {env.master_addr}:{env.master_port} within {timeout:g} s "
            f"(DataParallel(timeout=...), --dist-timeout): {str(exc).splitlines()[0]}"
        ) from exc
    return dist.get_rank(), dist.get_world_size()


_STORE: list = []  # the store of the joined group, for dist_roll_call


def dist_roll_call(tag: str, wait: float = 10.0):
    if not _STORE or not _joined():
        return None
    store = _STORE[0]
    dist = _dist()

    def has(key):
        return bool(store.check([key]))

    try:
        return roll_call(lambda k: store.set(k, "1"), has, tag, dist.get_rank(), dist.get_world_size(), wait)
    except (RuntimeError, ValueError):  # the store is gone (its host stopped)
        return None


def dist_world() -> tuple[int, int]:
    if not _joined():
        return 0, 1
    dist = _dist()
    return dist.get_rank(), dist.get_world_size()


def dist_step(fn, sharded=()):
    # eager collectives: each rank runs fn on its own arguments
    return fn


def all_reduce_sum(x):
    dist = _dist()
    out = x.detach().clone()
    if _joined():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather(x):
    dist = _dist()
    x = x.detach().contiguous()
    if not _joined():
        return x[None]
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.stack(parts)


def host_all_gather(x):
    a = np.ascontiguousarray(np.asarray(x))
    raw = torch.from_numpy(a.reshape(-1).view(np.uint8).copy())  # bytes: any dtype crosses gloo
    if _joined() and _dist().get_backend() == "nccl":  # pragma: no cover - needs GPUs
        raw = raw.to(torch.device("cuda", torch.cuda.current_device()))
    out = all_gather(raw).cpu().numpy()
    return out.view(a.dtype).reshape((out.shape[0], *a.shape))


def dist_shutdown() -> None:
    _STORE.clear()
    if _joined():
        _dist().destroy_process_group()


# what torch.distributed's failures say (DistBackendError, DistNetworkError, gloo/NCCL timeouts)
_COLLECTIVE_WORDS = (
    "gloo",
    "nccl",
    "connection",
    "timed out",
    "timeout",
    "peer",
    "collective",
    "distbackend",
)


def is_collective_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, RuntimeError) and any(w in text for w in _COLLECTIVE_WORDS)
