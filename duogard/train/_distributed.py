"""Data-parallel training: :class:`DataParallel`, what ``fit(..., distributed=True)`` adds.

W processes (ranks), started by ``torchrun --nproc-per-node W`` (the same command for both
backends), run the same :func:`duogard.fit`. Each step's batch is the single-process batch,
split into W equal, contiguous shards (``batch_size`` must be divisible by W); the step's key is
the same on every rank (``fold_in(key, step)``), so every rank draws the same tangents. Then,
per step, the ranks exchange (one collective, the mean weighted by shard size):

- ``"forward"`` estimators: the K directional derivatives and the loss, **K + 1 numbers**
  (:meth:`duogard.grad.Forward.directional`); each rank combines their mean with the tangents
  it drew itself (:meth:`~duogard.grad.Forward.combine`). Parameters are never sent.
- backprop (and any estimator whose estimate is not a function of K scalars, e.g.
  ``"forward-activity"``, whose per-example activity perturbations give a parameter-sized
  estimate): the estimate itself and the loss, **P + 1 numbers** in one flat buffer, as DDP's
  gradient all-reduce does.
- ``DataParallel(tangents="per_rank")``: rank r draws its own K tangents from ``fold_in(key,
  r)``; an all-gather of the W·(K + 1) numbers, and every rank regenerates all W·K tangents:
  the estimate averages W·K tangents (W times lower variance than K) for O(W·K) numbers.

The collective is the *reduce* part of the one training step (:func:`duogard.step.build_step`,
between the estimate and the update): a :class:`DataParallel` is that part, and fit builds the
Trainer's step with it. Every rank then applies the same update (the Trainer's update
strategy), so the parameters stay bitwise identical across ranks; a
:class:`~duogard.train.Checkpointer` compares a hash of them on every rank at each checkpoint.
Evaluation, diagnostics, log files, the progress bar and checkpoint writing run on rank 0
only; every other callback (``OnNonFinite``, plain functions, your own) runs on every rank. A
checkpoint of a data-parallel run is an ordinary checkpoint: it resumes single-process, and a
single-process one resumes data-parallel, exactly. Under ``torchrun
--max-restarts`` a restarted group resumes from its Checkpointer's directory.

Collectives have a timeout (``DataParallel(timeout=...)``): a rank that stops or hangs makes the
others fail with :class:`~duogard.train.DistributedError` naming it, instead of waiting forever.
"""

from __future__ import annotations

import hashlib

import numpy as np

from duogard.backend._contract_dist import DistributedError
from duogard.grad import Forward
from duogard.grad._base import FlatView
from duogard.train._callbacks import Callback, Checkpointer, Diagnostics, Evaluate, LogFile, Progress
from duogard.tree import tree_leaves, tree_map, tree_size

__all__ = ["DataParallel", "DistributedError", "TANGENT_MODES", "distributed_callbacks"]

#: ``DataParallel(tangents=...)``: one tangent key for all ranks, or one per rank.
TANGENT_MODES = ("shared", "per_rank")
#: callbacks that run on rank 0 only (they read or report, and must not repeat W times)
_RANK0_ONLY = (Evaluate, Diagnostics, LogFile, Progress)


class DataParallel(Callback):
    """Train data-parallel across the ranks of a ``torchrun`` launch (see the module docstring).

    Pass ``fit(..., distributed=True)`` (this with its defaults) or
    ``fit(..., distributed=DataParallel(tangents="per_rank"))``, or put it in ``callbacks``.
    The process group is joined from the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``) before fit makes any array.

    Args:
        tangents: ``"shared"`` (default: the same tangents on every rank; a run of W ranks
            follows the single-process trajectory) or ``"per_rank"`` (forward estimators only:
            rank r's tangents come from ``fold_in(key, r)``; W·K tangents per step).
        timeout: seconds a collective may wait for a peer before the run fails (and JAX's
            heartbeat timeout).
        config: named settings every rank must share, beyond what fit checks itself (the
            command line passes its flags, so a mismatch names the flag).

    At the start of a run the ranks compare their configuration, a digest per setting, in one
    collective: the model, loss, estimator and update strategy, the initial parameters and
    optimizer state (the seed, the model's sizes and the learning rate show there), the batch
    size, seed and steps, and every ``config`` entry. A difference is a
    :class:`DistributedError` naming each setting and the ranks that differ, before any step:
    ranks launched with different flags would otherwise train to different parameters.

    Attributes (after ``fit`` set it up):
        rank, world_size: this process's rank and the number of ranks.
        numbers_per_step: how many numbers each rank contributes to the step's collective.
        exchange: ``"directional"`` (K + 1 numbers), ``"gathered"`` (per-rank tangents) or
            ``"gradient"`` (P + 1 numbers).
        hashes: ``[(step, hex digest)]`` of the parameters, checked equal on every rank at each
            checkpoint.
    """

    order = 1  # before the Checkpointer's resume (5) and everything that reads the run

    def __init__(self, *, tangents: str = "shared", timeout: float = 300.0, config: dict | None = None):
        if config is not None and not isinstance(config, dict):
            raise TypeError(
                f"DataParallel: config must be a dict of named settings, got {type(config).__name__}"
            )
        self.config = dict(config or {})
        if tangents not in TANGENT_MODES:
            raise ValueError(f"DataParallel: tangents must be one of {TANGENT_MODES}, got {tangents!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"DataParallel: timeout must be positive seconds, got {timeout!r}")
        self.tangents, self.timeout = tangents, float(timeout)
        self.rank, self.world_size = 0, 1
        self.restart_count = 0
        self.numbers_per_step: int | None = None
        self.exchange: str | None = None
        self.hashes: list[tuple[int, str]] = []
        self.healthy = True
        self.current_step = 0
        self._be = None
        self._rank = None

    def __repr__(self) -> str:
        return f"DataParallel(tangents={self.tangents!r}, timeout={self.timeout:g})"

    # ---------------------------------------------------------------- set up by fit
    def setup(self, trainer, *, batch_size: int) -> None:
        """Join the process group and build the data-parallel step (fit calls it before it
        makes any array).

        Raises:
            DistributedError: no launch environment, or the group cannot be joined.
            ValueError: ``batch_size`` not divisible by the number of ranks; an update strategy
                or estimator that cannot run data-parallel.
        """
        from duogard.backend._contract_dist import launch_env

        be = self._be = trainer.be
        self.restart_count = launch_env("fit(distributed=...)").restart_count
        self.rank, self.world_size = be.dist_init(self.timeout)
        if batch_size % self.world_size:
            fix = batch_size - batch_size % self.world_size or self.world_size
            raise ValueError(
                f"fit: batch_size must be divisible by the number of ranks ({self.world_size}) in a "
                f"data-parallel run (each rank takes an equal, contiguous shard of the step's batch), "
                f"got batch_size={batch_size}; use e.g. {fix}"
            )
        if trainer.update_strategy in ("sgd-lean", "zo-lean"):
            name = "forward" if trainer.update_strategy == "sgd-lean" else "spsa"
            raise ValueError(
                f"fit: estimator {name}(lean=True) updates the params inside its own step and "
                "cannot run data-parallel; use lean=False with distributed="
            )
        if trainer.train_mode or trainer.state_names:
            # a shard's dropout masks and batch statistics are not the global batch's rows of
            # them: the run would silently differ from the single-process one
            raise ValueError(
                "fit: distributed= does not yet train a model with a training mode (dropout, batch "
                "norm): each rank would draw its shard's masks and batch statistics on its own and "
                "the run would differ from the single-process one; remove them or train single-process"
            )
        self.exchange = self.exchange_for(trainer.estimator)  # checks the estimator first
        self._rank = be.asarray(np.array([self.rank], dtype=np.int32))

    # ---------------------------------------------------------------- what fit asks of it
    @property
    def cache_key(self) -> tuple:
        """A Trainer reused across fits builds its data-parallel step once per this key."""
        return ("data-parallel", self.tangents, self.rank, self.world_size)

    def shard(self, data):
        """``data`` whose training batches are this rank's contiguous shard of the global batch."""
        return _Shard(data, self.rank, self.world_size)

    def step_key(self, key):
        """The data-parallel step's key: ``(the step's key, this rank's index)``."""
        return (key, self._rank)

    def on_fit_start(self, run):
        if self._be is None:
            raise RuntimeError("DataParallel: not set up for this run; pass it to fit(distributed=...)")
        self.check_same_config(run)
        size = tree_size(run.params)
        k = getattr(run.trainer.estimator, "num_tangents", 1)
        self.numbers_per_step = {
            "directional": k + 1,
            "gathered": self.world_size * (k + 1),
            "gradient": size + 1,
        }[self.exchange]

    def before_step(self, run, step, x, y, key):
        self.current_step = step + 1

    # ---------------------------------------------------------------- the step's reduce part
    def exchange_for(self, est) -> str:
        """What the step's collective carries for ``est``: ``"directional"`` (K + 1 numbers),
        ``"gathered"`` (per-rank tangents: W·(K + 1)) or ``"gradient"`` (P + 1).

        Raises:
            ValueError: ``tangents="per_rank"`` with an estimator that is not a plain forward
                gradient (or with ``projection=True``).
        """
        scalar = isinstance(est, Forward) and type(est).estimate_tree is Forward.estimate_tree
        if self.tangents == "per_rank":
            if not scalar:
                raise ValueError(
                    f"DataParallel: tangents='per_rank' needs a forward estimator (K directional "
                    f"derivatives per rank), got {est!r:.100}"
                )
            if est.projection:
                raise ValueError(
                    "DataParallel: tangents='per_rank' averages the ranks' estimates; with "
                    "projection=True they are not a mean over tangents: use tangents='shared'"
                )
        return "gradient" if not scalar else "directional" if self.tangents == "shared" else "gathered"

    def _weighted(self, loss, parts):
        """``[loss, *parts]`` times this rank's shard weight n_r / N (equal shards: 1 / W)."""
        xp = self._be.xp
        dtype = parts[0].dtype
        flat = xp.concat([xp.reshape(xp.astype(loss, dtype), (1,)), *(xp.reshape(p, (-1,)) for p in parts)])
        return flat * (1.0 / self.world_size)

    def reduce(self, loss, ds):
        """The mean over the ranks of the loss and the K directional derivatives (K + 1 numbers)."""
        buf = self._be.all_reduce_sum(self._weighted(loss, [ds]))
        return buf[0], buf[1:]

    def reduce_tree(self, loss, grads):
        """The mean over the ranks of the loss and the estimate (P + 1 numbers, one buffer)."""
        be, xp = self._be, self._be.xp
        view = FlatView.of(grads)
        buf = be.all_reduce_sum(self._weighted(loss, [view.flatten(be, grads)]))
        mean = view.unflatten(be, buf[1:])
        return buf[0], tree_map(lambda m, g: xp.astype(m, g.dtype), mean, grads)

    def gather(self, est, loss_fn, params, batch, step_key, rank):
        """Per-rank tangents: this rank's K directional derivatives along the tangents of
        ``fold_in(key, rank)``, an all-gather of the W·(K + 1) numbers, and every rank's tangents
        drawn again to combine them (the same order on every rank: the same bits).
        """
        be, xp = self._be, self._be.xp
        keys = [be.fold_in(step_key, r) for r in range(self.world_size)]
        own = xp.stack(keys)[rank[0]]
        loss, ds, _ = est.directional(loss_fn, params, batch, own)
        every = be.all_gather(self._weighted(loss, [ds]))  # (W, K + 1)
        grads = None
        for r in range(self.world_size):
            g = est.combine(every[r, 1:], est.tangent_tree(params, keys[r]))
            grads = g if grads is None else tree_map(lambda a, b: a + b, grads, g)
        return xp.sum(every[:, 0]), grads

    def run_step(self, step, params, opt_state, x, y, key):
        """One data-parallel step on this rank's shard ``(x, y)``; a failed collective is a
        :class:`DistributedError` naming the rank that stopped.
        """
        try:
            return step(params, opt_state, x, y, self.step_key(key))
        except (DistributedError, RuntimeError) as exc:
            if not (isinstance(exc, DistributedError) or self._be.is_collective_failure(exc)):
                raise
            raise self.failure(exc, f"the collective of step {self.current_step}") from exc

    # ---------------------------------------------------------------- checks and failures
    def check_same_params(self, run, step: int) -> str:
        """Compare a hash of the parameters across the ranks (a collective: every rank calls it
        at the same step); returns the hex digest.

        Raises:
            DistributedError: the ranks whose parameters differ from rank 0's.
        """
        be = run.be
        h = hashlib.sha256()
        for leaf in tree_leaves(run.params):
            a = np.ascontiguousarray(be.to_numpy(leaf))
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        mine = np.frombuffer(h.digest(), dtype=np.uint8)
        try:
            every = be.host_all_gather(mine)
        except Exception as exc:
            raise self.failure(exc, f"the parameter check at step {step}") from exc
        bad = [r for r in range(every.shape[0]) if not np.array_equal(every[r], every[0])]
        if bad:
            raise DistributedError(
                f"fit: at step {step} the parameters of rank(s) {bad} differ from rank 0's "
                f"(sha256 {every[0].tobytes().hex()[:16]}... against "
                f"{', '.join(every[r].tobytes().hex()[:16] for r in bad)}...); the ranks must run the "
                "same model, data, seed and duogard version"
            )
        digest = h.hexdigest()
        self.hashes.append((step, digest))
        return digest

    def settings(self, run) -> dict[str, bytes]:
        """A digest of each setting the ranks must share (see the class docstring)."""
        be = run.be

        def arrays(tree) -> bytes:
            h = hashlib.sha256()
            for leaf in tree_leaves(tree):
                a = np.ascontiguousarray(be.to_numpy(leaf)) if be.is_array(leaf) else np.asarray(leaf)
                h.update(f"{a.dtype.str}{a.shape}".encode())
                h.update(a.tobytes())
            return h.digest()

        tr = run.trainer
        named = {
            "model": repr(tr.model),
            "loss": repr(tr.loss_fn),
            "estimator": repr(tr.estimator),
            "update strategy": run.step.strategy,
            "batch_size": run.batch_size,
            "seed": run.seed,
            "steps": run.steps,
            **{str(k): v for k, v in sorted(self.config.items())},
        }
        out = {k: hashlib.sha256(repr(v).encode()).digest() for k, v in named.items()}
        out["initial parameters"] = arrays(run.params)
        out["optimizer state"] = arrays(run.opt_state)
        return out

    def check_same_config(self, run) -> None:
        """Compare :meth:`settings` across the ranks (a collective: every rank calls it first).

        Raises:
            DistributedError: the settings that differ from rank 0's, with the ranks.
        """
        mine = self.settings(run)
        names = sorted(mine)
        key = hashlib.sha256("\0".join(names).encode()).digest()[:8]
        try:  # the same set of settings first: the digests' gather needs one shape on every rank
            keys = self._be.host_all_gather(np.frombuffer(key, dtype=np.uint8))
            bad = [r for r in range(keys.shape[0]) if not np.array_equal(keys[r], keys[0])]
            if bad:
                raise DistributedError(
                    f"fit: rank(s) {bad} name other settings than rank 0 ({', '.join(names)} here); "
                    "launch every rank with the same command, flags and duogard version"
                )
            every = self._be.host_all_gather(np.frombuffer(b"".join(mine[n] for n in names), dtype=np.uint8))
        except DistributedError:
            raise
        except Exception as exc:
            raise self.failure(exc, "the configuration check") from exc
        every = every.reshape(every.shape[0], len(names), -1)
        differ = {
            n: [r for r in range(every.shape[0]) if not np.array_equal(every[r, i], every[0, i])]
            for i, n in enumerate(names)
        }
        differ = {n: ranks for n, ranks in differ.items() if ranks}
        if differ:
            said = "; ".join(f"{n} (rank(s) {ranks} differ from rank 0)" for n, ranks in differ.items())
            raise DistributedError(
                f"fit: the ranks do not run the same configuration: {said}. Every rank must be "
                "launched with the same flags (torchrun starts one command on every rank)"
            )

    def failure(self, exc: BaseException, what: str) -> DistributedError:
        """The error for a failed collective: which ranks stopped answering, and the cause."""
        self.healthy = False
        cause = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, DistributedError) and cause.startswith("fit: rank"):
            return exc
        others = [r for r in range(self.world_size) if r != self.rank]
        who = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {others}"
        if len(others) > 1 and self._be is not None:
            # which ones: a roll call in the launch's store; the ranks that never answer stopped
            present = self._be.dist_roll_call(
                f"{self.restart_count}/{self.current_step}", wait=min(3.0, self.timeout)
            )
            missing = [r for r in others if present is not None and r not in present]
            if missing:
                who = f"rank {missing[0]}" if len(missing) == 1 else f"ranks {missing}"
        return DistributedError(
            f"fit: rank {self.rank} of {self.world_size}: {what} failed: {who} stopped or did not "
            f"answer within {self.timeout:g} s (DataParallel(timeout=...)); {type(exc).__name__}: {cause}"
        )


class _Shard:
    """A dataset whose training batches are this rank's contiguous shard of the global batch."""

    def __init__(self, data, rank: int, world: int):
        self.base, self.rank, self.world = data, rank, world

    def batch_at(self, step, batch_size, *, seed=0, drop_last=True):
        """Rows ``[rank·n, (rank+1)·n)`` (n = batch_size / W) of the global batch of ``step``."""
        x, y = self.base.batch_at(step, batch_size, seed=seed, drop_last=drop_last)
        n = batch_size // self.world
        return x[self.rank * n : (self.rank + 1) * n], y[self.rank * n : (self.rank + 1) * n]

    def __getattr__(self, name):
        return getattr(self.base, name)


class _RankCheckpointer(Callback):
    """A :class:`Checkpointer` in a data-parallel run: every rank resumes; at each save the
    ranks compare a hash of their parameters; rank 0 writes.
    """

    def __init__(self, cp: Checkpointer, dp: DataParallel):
        self.cp, self.dp, self.order = cp, dp, cp.order

    def on_fit_start(self, run):
        cp, dp = self.cp, self.dp
        if cp.resume is None and dp.restart_count and cp.directory is not None:
            from duogard.train.checkpoint import is_checkpoint

            if is_checkpoint(cp.directory):  # torchrun --max-restarts: go on from the last save
                cp.resume = cp.directory
        if dp.rank == 0:
            cp.on_fit_start(run)
        elif cp.resume is not None:
            Checkpointer(None, resume=cp.resume).on_fit_start(run)  # load only; rank 0 writes

    def on_step_end(self, run, record):
        cp = self.cp
        if cp.every and record["step"] % cp.every == 0:
            self.dp.check_same_params(run, record["step"])
            if self.dp.rank == 0:
                cp.save(run, record["step"])

    def on_fit_end(self, run):
        try:
            # a completed run: every rank is here at the same step (after an error, ranks may
            # not be: no collective then, rank 0 saves its last good params)
            step, done = run.result.step, [s for s, _ in self.dp.hashes[-1:]]
            if run.completed and self.dp.healthy and self.cp.directory is not None and done != [step]:
                self.dp.check_same_params(run, step)
        finally:
            if self.dp.rank == 0:
                self.cp.on_fit_end(run)


def distributed_callbacks(
    cbs: list, distributed, trainer, *, batch_size: int
) -> tuple[list, DataParallel | None]:
    """The callbacks of fit for this rank (unchanged without ``distributed`` or a
    :class:`DataParallel` among them) and the :class:`DataParallel` (None: a single-process
    run); joins the process group first.

    Raises:
        TypeError: ``distributed`` is not a bool or a :class:`DataParallel`.
        ValueError: two DataParallel objects.
    """
    given = [c for c in cbs if isinstance(c, DataParallel)]
    if distributed is None or distributed is False:
        if not given:
            return cbs, None
    elif distributed is True or isinstance(distributed, DataParallel):
        dp = DataParallel() if distributed is True else distributed
        if given and given != [dp]:
            raise ValueError("fit: a DataParallel in callbacks and distributed= both given; give one")
        if not given:
            cbs = sorted([*cbs, dp], key=lambda c: c.order)
            given = [dp]
    else:
        raise TypeError(
            f"fit: distributed must be True, False or a DataParallel(...), got {distributed!r:.80}"
        )
    if len(given) > 1:
        raise ValueError(f"fit: at most one DataParallel in callbacks, got {len(given)}")
    dp = given[0]
    dp.setup(trainer, batch_size=batch_size)
    out = []
    for c in cbs:
        if isinstance(c, Checkpointer):
            out.append(_RankCheckpointer(c, dp))
        elif dp.rank == 0 or not isinstance(c, _RANK0_ONLY):
            out.append(c)
    return out, dp
