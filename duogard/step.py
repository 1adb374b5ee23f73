"""The one training step: draw, estimate, reduce, update.

Every way duogard trains calls :func:`build_step`, with different parts, never a copy of it:
:class:`duogard.train.Trainer` (and so :func:`duogard.fit`), the data-parallel step (a
collective inserted between the estimate and the update),
:func:`duogard.parity.compare_backends` (tangents given instead of drawn), the lean steps
(``update="sgd-lean"``, ``"zo-lean"``) and the torch port's ``forward_grad_``
(``update="none"``: the estimate is returned for ``torch.optim`` to apply).

A step is, in order:

1. **draw**: the step's key gives the tangents (or perturbations) and, for a model with a
   training mode, the model key ``fold_in(key, MODEL_KEY)`` (dropout masks); or the tangents
   are given (``tangents="given"``: a parity run draws them once and shares them).
2. **estimate**: the estimator's loss and estimate, as a gradient, or as ``d`` and ``v`` (the
   factored form of a one-tangent forward gradient), or as the K directional derivatives.
3. **reduce**: nothing, or the collective of a data-parallel run: the mean of the ranks' K + 1
   numbers for forward gradients (each rank combines it with the tangents it drew), of the
   P + 1 numbers of the gradient otherwise.
4. **update**: the strategy named when the step is built (:data:`UPDATE_STRATEGIES`):

   - ``"optimizer"``: any optimizer: ``updates, state = opt.update(grads, state, params)`` and
     ``apply_updates`` (new arrays).
   - ``"sgd-in-backward"``: the same optimizer with ``estimator("backprop")`` (checkpointed or
     not) on a backend whose reverse pass hands each gradient over as it completes
     (``be.streams_gradients``: PyTorch): each leaf is updated in place by ``PlainSGD.apply_``
     as soon as its gradient is complete, and the gradient is freed before the pass goes on
     (``be.grad_stream``: torch's "optimizer step in the backward pass"), so the step never
     holds the whole gradient; the loss is checked before the reverse pass. The same numbers
     as ``"sgd-in-place"`` (bitwise on torch; the norm ``|g|²`` summed leaf by leaf, to
     rounding). Elsewhere (JAX, where one program computes the gradient whole) it runs, with
     these numbers, but ``"auto"`` does not pick it.
   - ``"sgd-in-place"``: a momentum-free :func:`duogard.optim.sgd`
     (:class:`~duogard.optim.PlainSGD`) with any estimator: each leaf is updated in one pass, in
     place on torch and into the donated buffer on JAX, by ``PlainSGD.apply_``.
   - ``"sgd-factored"``: the same optimizer with a forward gradient of one tangent, whose
     estimate is ``d v``: ``p -= lr d v`` through the same ``apply_``, so the gradient array
     ``d v`` is never written.
   - ``"sgd-lean"``: the same optimizer with a forward estimator: the layer-by-layer step of
     :class:`duogard.grad.LeanStep` (each tangent drawn twice, never a whole-model buffer).
   - ``"zo-lean"``: the same optimizer with ``estimator("spsa")``: MeZO's step,
     :class:`duogard.grad.ZerothLeanStep` (the params perturbed in place, each perturbation
     regenerated from its key: the step's memory is that of inference). It equals
     ``"sgd-factored"``/``"sgd-in-place"`` to rounding (restoring ``θ ± εz`` drifts by a few
     units in the last place), not bitwise.
   - ``"none"``: no update; the step returns the estimate (the torch port's ``forward_grad_``).

   Every SGD strategy gives the numbers of ``"optimizer"`` (the tests check each against
   ``opt.update`` + ``apply_updates`` on both backends).

A step whose loss or gradient is not finite returns the params and optimizer state it was
given, unchanged, and its fourth result is NaN. One exception, by construction:
``"sgd-in-backward"`` writes each leaf before the next gradient exists, so when a gradient
leaf is not finite under a finite loss, the leaves handed over before it (the layers after it)
keep their update; that leaf and the later ones are left unchanged, the optimizer state too,
and the fourth result is NaN as for any refused step. Undoing those updates would need their
gradients, which is the memory the strategy saves. A non-finite loss is caught before the
reverse pass (nothing is written), and a NaN or inf that starts at the loss reaches the last
layer's gradient first (nothing is written either); use ``update="sgd-in-place"`` for an
all-or-nothing step whatever the cause.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from duogard.grad import SPSA, Backprop, Forward, LeanStep, ZerothLeanStep
from duogard.grad._objective import MODEL_KEY, Batch, model_batch
from duogard.optim import PlainSGD, apply_updates
from duogard.tree import Rank1, tree_flatten, tree_leaves, tree_map, tree_unflatten

__all__ = [
    "Batch",
    "MODEL_KEY",
    "UPDATE_STRATEGIES",
    "Step",
    "build_step",
    "choose_update",
    "keep_if",
    "split_state",
]

#: The update strategies: the five that :func:`choose_update` picks from, in the order it
#: considers them, and ``"none"`` (no update: the step returns the estimate).
UPDATE_STRATEGIES = (
    "zo-lean",
    "sgd-lean",
    "sgd-factored",
    "sgd-in-backward",
    "sgd-in-place",
    "optimizer",
    "none",
)
_ALIASES = {
    "lean": "sgd-lean",
    "factored": "sgd-factored",
    "in-place": "sgd-in-place",
    "in-backward": "sgd-in-backward",
}


def choose_update(optimizer, estimator, update: str = "auto", *, be=None) -> str:
    """The update strategy for this optimizer and estimator (on backend ``be``).

    Args:
        optimizer: a ``GradientTransformation`` (None only with ``update="none"``).
        estimator: a gradient estimator.
        update: ``"auto"`` (the cheapest strategy that gives the optimizer's numbers:
            ``"zo-lean"`` for ``estimator("spsa", lean=True)``, ``"sgd-lean"`` for
            ``estimator("forward", lean=True)``, ``"sgd-factored"`` for a one-tangent forward
            gradient (or one-query SPSA) with a momentum-free SGD, ``"sgd-in-backward"`` for
            ``estimator("backprop")`` with it on a backend that streams gradients (``be`` given,
            ``be.streams_gradients``), ``"sgd-in-place"`` for any other estimator with it,
            ``"optimizer"`` otherwise), or one of :data:`UPDATE_STRATEGIES` (``"factored"``,
            ``"in-place"`` and ``"in-backward"`` are short for the ``sgd-`` names; ``"lean"``
            for ``"zo-lean"`` with SPSA, ``"sgd-lean"`` otherwise) to state it.
        be: the backend the step runs on (None: pick as if it computed gradients whole).

    Returns:
        One of :data:`UPDATE_STRATEGIES`.

    Raises:
        ValueError: an unknown strategy, or one that this optimizer and estimator cannot run
            (the SGD strategies need a momentum-free :func:`duogard.optim.sgd`; ``"sgd-lean"``
            and ``"sgd-factored"`` need a forward estimator that allows them, ``"zo-lean"`` an
            SPSA estimator, ``"sgd-in-backward"`` a backprop estimator).
    """
    if not isinstance(update, str):
        raise TypeError(f"update must be a strategy name (a str), got {type(update).__name__}")
    zeroth = isinstance(estimator, SPSA)
    update = "zo-lean" if update == "lean" and zeroth else _ALIASES.get(update, update)
    if update != "auto" and update not in UPDATE_STRATEGIES:
        raise ValueError(f"update must be 'auto' or one of {UPDATE_STRATEGIES}, got {update!r}")
    plain = isinstance(optimizer, PlainSGD)
    forward = isinstance(estimator, Forward)  # SPSA is one too: the same tangents, K numbers
    backward = isinstance(estimator, Backprop) and estimator.in_backward
    if update == "auto":
        if zeroth and estimator.lean:
            update = "zo-lean"
        elif forward and estimator.lean:
            update = "sgd-lean"
        elif plain and forward and estimator.factored_form:
            update = "sgd-factored"
        elif plain and backward and getattr(be, "streams_gradients", False):
            update = "sgd-in-backward"
        elif plain:
            update = "sgd-in-place"
        else:
            update = "optimizer"
    if update in ("none", "optimizer"):
        if update == "optimizer" and optimizer is None:
            raise ValueError("update='optimizer' needs an optimizer, got None")
        return update
    if not plain:
        lean = {"sgd-lean": "estimator forward(lean=True)", "zo-lean": "estimator spsa(lean=True)"}
        what = lean.get(update, f"update={update!r}")
        raise ValueError(
            f"Trainer: {what} applies the SGD update itself, leaf by leaf; optimizer must be "
            f"duogard.optim.sgd(learning_rate, weight_decay=...) without momentum, got {optimizer!r:.120}"
        )
    if update == "sgd-lean" and (zeroth or not forward):
        raise ValueError(f"update='sgd-lean' needs a forward estimator, got {estimator!r:.100}")
    if update == "zo-lean" and not zeroth:
        raise ValueError(f"update='zo-lean' needs an spsa estimator, got {estimator!r:.100}")
    if update == "sgd-lean" and (estimator.orthogonal or estimator.projection):
        raise ValueError(
            "update='sgd-lean' draws each leaf's tangent on its own: not with orthogonal/projection"
        )
    if update == "sgd-in-backward" and not backward:
        raise ValueError(
            f"update='sgd-in-backward' applies the gradient of reverse mode as it comes: it needs "
            f"estimator('backprop'), got {estimator!r:.100}"
        )
    if update == "sgd-factored" and not (forward and estimator.factored_form):
        raise ValueError(
            f"update='sgd-factored' needs a forward estimator of one tangent without projection, "
            f"got {estimator!r:.100}"
        )
    return update


class Step:
    """A built step: ``step(params, opt_state, x, y, key, tangents=None) -> (params, opt_state,
    loss, |g|²)`` (and the estimate fifth with ``return_estimate``/``update="none"``).

    Attributes:
        strategy: the update strategy (:data:`UPDATE_STRATEGIES`).
        exchange: what a data-parallel step's collective carries (``"directional"``: K + 1
            numbers, ``"gathered"``: W·(K + 1), ``"gradient"``: P + 1), or None.
    """

    def __init__(self, fn: Callable, *, be, strategy: str, exchange: str | None = None):
        self._fn, self.be, self.strategy, self.exchange = fn, be, strategy, exchange

    def __call__(self, params, opt_state, x, y, key, tangents=None):
        if tangents is None:
            return self._fn(params, opt_state, x, y, key)
        return self._fn(params, opt_state, x, y, key, tangents)

    def compiles(self) -> int | None:
        """How many programs the step has compiled (None where the backend does not count)."""
        return self.be.compile_count(self._fn)

    def __repr__(self) -> str:
        return f"Step(strategy={self.strategy!r}, exchange={self.exchange!r})"


def build_step(
    be,
    loss_fn: Callable,
    estimator,
    optimizer=None,
    *,
    update: str = "auto",
    train_mode: bool = False,
    state=None,
    collective=None,
    grad_norm: bool = True,
    compile: bool | None = None,
    tangents: str = "draw",
    return_estimate: bool = False,
) -> Step:
    """Build the training step (see the module docstring for its parts).

    Args:
        be: the backend.
        loss_fn: ``loss_fn(params, batch) -> scalar``; ``batch`` is a :class:`Batch`.
        estimator: the gradient estimator.
        optimizer: the optimizer (a :class:`~duogard.optim.PlainSGD` for the SGD strategies;
            None with ``update="none"``).
        update: the update strategy, or ``"auto"`` (:func:`choose_update`).
        train_mode: the model has a training mode (dropout, batch statistics): the loss sees the
            model key ``fold_in(key, MODEL_KEY)`` in its batch.
        state: ``(model, names)`` for a model with state (batch norm's running statistics) kept in
            ``params`` under ``names``: no estimator or optimizer sees it; each step replaces it
            with ``model.update_state`` over the step's batch (kept when the step is refused).
        collective: the reduce part of a data-parallel step (an object with ``exchange_for``,
            ``reduce`` and ``gather``; :class:`duogard.train.DataParallel` makes it); the step
            then takes ``(key, rank)`` as its key and runs as one ``be.dist_step`` program.
        grad_norm: return ``|g|²`` (one more pass over the gradient); without it the step still
            refuses a non-finite gradient with a finite loss (its fourth result is then 0, NaN
            for a refused step).
        compile: as ``be.jit``'s ``compile`` (None: the backend's default).
        tangents: ``"draw"`` (from the step's key) or ``"given"``: the step takes the estimator's
            sample (``estimator.sample(...)``, drawn elsewhere: a parity run draws them once and
            shares them) as its sixth argument. Then the estimate is a gradient (no
            ``"sgd-factored"``: it becomes ``"sgd-in-place"``).
        return_estimate: also return the estimate (a params-shaped tree), fifth.

    Returns:
        A :class:`Step`.
    """
    strategy = choose_update(optimizer, estimator, update, be=be)
    if tangents not in ("draw", "given"):
        raise ValueError(f"build_step: tangents must be 'draw' or 'given', got {tangents!r}")
    jit_kw = {} if compile is None else {"compile": bool(compile)}
    if strategy == "sgd-in-backward" and (collective is not None or tangents == "given" or return_estimate):
        strategy = "sgd-in-place"  # the whole gradient is needed: reduced, compared or returned
    if strategy == "sgd-in-backward":
        return _in_backward_step(be, loss_fn, estimator, optimizer, train_mode, state, grad_norm, jit_kw)
    if strategy == "sgd-lean":
        return _lean_step(be, loss_fn, estimator, optimizer, train_mode, state, collective, compile)
    if strategy == "zo-lean":
        return _zo_lean_step(be, loss_fn, estimator, optimizer, train_mode, state, collective, compile)
    exchange = None if collective is None else collective.exchange_for(estimator)
    if strategy == "sgd-factored" and (exchange not in (None, "directional") or tangents == "given"):
        strategy = "sgd-in-place"  # W·K tangents, or given ones: the estimate is no longer one d·v
    xp = be.xp
    factored = strategy == "sgd-factored"
    with_estimate = return_estimate or strategy == "none"

    def estimate(params, batch, key, given):
        """``(loss, grads, coef)``: the estimate is ``coef * grads`` (coef None: ``grads``)."""
        if given is not None:  # tangents drawn elsewhere (a parity run shares them)
            return (*estimator.estimate(loss_fn, params, batch, given), None)
        if collective is None:
            if factored:
                value, coef, v = estimator.factored(loss_fn, params, batch, key)
                return value, v, coef
            return (*estimator(loss_fn, params, batch, key), None)
        step_key, rank = key
        if exchange == "directional":  # estimate, reduce the K + 1 numbers, combine
            value, ds, vtree = estimator.directional(loss_fn, params, batch, step_key)
            value, ds = collective.reduce(value, ds)
            if factored:
                return value, tree_map(lambda t: t if isinstance(t, Rank1) else t[0], vtree), ds[0]
            return value, estimator.combine(ds, vtree), None
        if exchange == "gathered":  # each rank's own tangents: gather W·(K + 1) numbers
            return (*collective.gather(estimator, loss_fn, params, batch, step_key, rank), None)
        value, grads = estimator(loss_fn, params, batch, step_key)  # the P + 1 numbers
        return (*collective.reduce_tree(value, grads), None)

    def step(params, opt_state, x, y, key, given=None):
        step_key = key if collective is None else key[0]
        batch = model_batch(be, x, y, step_key, train_mode)
        value, grads, coef = estimate(params, batch, key, given)
        if grad_norm:
            gsq = _sq_norm(be, tree_leaves(grads))
            if coef is not None:
                gsq = gsq * coef * coef
            ok = _both_finite(be, value, gsq)
        else:
            # no norm, but still no update from a NaN/inf gradient under a finite loss: the
            # factored estimate d v is finite where d is (v is drawn); else every element is read
            ok = _both_finite(be, value, _all_finite(be, grads if coef is None else [coef]))
            gsq = _zero_or_nan(be, ok, value)
        if with_estimate and coef is not None:
            grads = tree_map(lambda v: coef * (v.dense(xp)[0] if isinstance(v, Rank1) else v), grads)
            coef = None
        new_state = opt_state
        if strategy == "optimizer":
            updates, new_state = optimizer.update(grads, opt_state, params)
            params = keep_if(be, ok, apply_updates(params, updates), params)
        elif strategy != "none":
            lr, new_state = optimizer.advance(opt_state)
            params = optimizer.apply_tree_(be, params, grads, lr, scale=coef, where=ok)
        out = (params, keep_if(be, ok, new_state, opt_state), value, gsq)
        return (*out, grads) if with_estimate else out

    if collective is not None:
        # x and y are this rank's shards; the key pair is (the step's key, this rank's index)
        fn = be.dist_step(step, sharded=(False, False, True, True, (False, True)))
    else:
        # params are donated: the SGD strategies update them in place under XLA too
        fn = be.jit(step, donate_argnums=(0,) if strategy != "none" else (), **jit_kw)
    if state is not None:
        fn = _stateful(be, fn, state, jit_kw)
    return Step(fn, be=be, strategy=strategy, exchange=exchange)


def _in_backward_step(be, loss_fn, estimator, optimizer, train_mode, state, grad_norm, jit_kw) -> Step:
    """The ``"sgd-in-backward"`` step: ``PlainSGD.apply_`` on each leaf as ``be.grad_stream``
    hands its gradient over, the loss checked first (see the module docstring for a gradient
    that is not finite).

    Outside a traced program every check is read on the host (nothing is written for a refused
    leaf); inside one (JAX) the same checks select with ``where``.
    """
    xp = be.xp

    def step(params, opt_state, x, y, key, given=None):
        if given is not None:
            raise ValueError("update='sgd-in-backward' computes its own gradient; it takes no tangents")
        batch = model_batch(be, x, y, key, train_mode)
        value, backward = estimator.grad_stream(loss_fn, params, batch)
        ok = _finite(be, value)
        if ok is False:  # read on the host: no reverse pass, nothing written
            return params, opt_state, value, xp.full_like(value, float("nan"))
        lr, new_state = optimizer.advance(opt_state)
        update = optimizer.updater(be, lr)
        leaves, treedef = tree_flatten(params)
        new = list(leaves)
        run = {"ok": ok, "gsq": 0.0}  # |g|² on the host (a float), or a 0-d array when traced

        def apply(i, grad):
            # |g_i|², or the sum: a NaN or inf in the leaf makes either NaN or inf (_all_finite)
            part = be.sum_of_squares([grad]) if grad_norm else xp.sum(grad)
            if be.is_tracing(part):
                run["ok"] = _and(be, run["ok"], xp.isfinite(part))
                run["gsq"] = run["gsq"] + part
            else:  # one read on the host: the check, and this leaf's part of the norm
                part = float(part)
                run["ok"] = run["ok"] and math.isfinite(part)
                run["gsq"] += part
            if run["ok"] is True:
                new[i] = update(leaves[i], grad)
            elif run["ok"] is not False:  # traced: where the running check holds
                new[i] = update(leaves[i], grad, where=run["ok"])

        backward(apply)
        ok = run["ok"]
        if grad_norm and ok is not False:
            gsq = xp.full_like(value, run["gsq"]) if isinstance(run["gsq"], float) else run["gsq"]
        else:
            gsq = _zero_or_nan(be, ok, value)
        return tree_unflatten(treedef, new), keep_if(be, ok, new_state, opt_state), value, gsq

    fn = be.jit(step, donate_argnums=(0,), **jit_kw)
    if state is not None:
        fn = _stateful(be, fn, state, jit_kw)
    return Step(fn, be=be, strategy="sgd-in-backward")


def _finite(be, x):
    """Whether 0-d ``x`` is finite (true, for a bool): a Python bool read on the host outside a
    traced program, else a 0-d bool array.
    """
    xp = be.xp
    if be.is_tracing(x):
        return x if xp.isdtype(x.dtype, "bool") else xp.isfinite(x)
    return bool(x) if xp.isdtype(x.dtype, "bool") else math.isfinite(float(x))


def _and(be, a, b):
    """``a and b`` for two checks of :func:`_finite` (Python bools, or 0-d bool arrays)."""
    if isinstance(a, bool) and isinstance(b, bool):
        return a and b
    if a is True or b is True:
        return b if a is True else a
    return be.xp.logical_and(a, b)


def _lean_step(be, loss_fn, estimator, optimizer, train_mode, state, collective, compile) -> Step:
    """The ``"sgd-lean"`` step: :class:`duogard.grad.LeanStep`'s own per-layer programs."""
    if train_mode or state is not None:
        raise ValueError(
            "Trainer: estimator forward(lean=True) runs duogard's layer-by-layer rules, which "
            "have no training mode; the model has one (dropout or batch norm). Use lean=False"
        )
    if collective is not None:
        raise ValueError(
            "fit: estimator forward(lean=True) updates layer by layer inside its own step and "
            "cannot run data-parallel; use lean=False with distributed="
        )
    lean = LeanStep(estimator, loss_fn, be, optimizer, compile=compile)

    def step(params, opt_state, x, y, key, given=None):
        if given is not None:
            raise ValueError("the lean step draws its own tangents; it cannot take given ones")
        return lean.step(params, opt_state, Batch(x, y), key)

    return Step(step, be=be, strategy="sgd-lean")


def _zo_lean_step(be, loss_fn, estimator, optimizer, train_mode, state, collective, compile) -> Step:
    """The ``"zo-lean"`` step: :class:`duogard.grad.ZerothLeanStep`'s in-place perturbations."""
    if collective is not None:
        raise ValueError(
            "fit: estimator spsa(lean=True) perturbs and updates the params in place inside its own "
            "step and cannot run data-parallel; use lean=False with distributed="
        )
    lean = ZerothLeanStep(estimator, loss_fn, be, optimizer, compile=compile)

    def step(params, opt_state, x, y, key, given=None):
        if given is not None:
            raise ValueError("the zo-lean step draws its own perturbations; it cannot take given ones")
        batch = model_batch(be, x, y, key, train_mode)
        return lean.step(params, opt_state, batch, key)

    jit_kw = {} if compile is None else {"compile": bool(compile)}
    return Step(step if state is None else _stateful(be, step, state, jit_kw), be=be, strategy="zo-lean")


def split_state(params, names) -> tuple[dict, dict]:
    """``(trainable, state)``: the entries ``names`` taken out of a flat ``params`` dict."""
    if not names:
        return params, {}
    return {k: v for k, v in params.items() if k not in names}, {k: params[k] for k in names}


def _stateful(be, fn, state, jit_kw):
    """``fn`` for a model with state: the state rides in ``params`` but no estimator sees it; it
    is replaced by ``model.update_state`` over the step's batch, with the step's model key, from
    the params before the update (as torch's training-mode forward updates it), and kept
    unchanged when the step is refused.
    """
    model, names = state
    update = be.jit(lambda p, x, k: model.update_state(p, x, key=k), **jit_kw)

    def stateful(params, opt_state, x, y, key, *given):
        trainable, old = split_state(params, names)
        new = update(params, x, be.fold_in(key, MODEL_KEY))  # the step's model key
        trainable, opt_state, value, gsq, *rest = fn(trainable, opt_state, x, y, key, *given)
        ok = be.xp.logical_and(be.xp.isfinite(value), be.xp.isfinite(gsq))
        return ({**trainable, **keep_if(be, ok, new, old)}, opt_state, value, gsq, *rest)

    stateful.compile_count = lambda: be.compile_count(fn)
    return stateful


def _all_finite(be, tree):
    """A 0-d bool array: every element of every leaf of ``tree`` is finite."""
    xp, ok = be.xp, None
    for leaf in tree_leaves(tree):
        for part in (leaf.u, leaf.w) if isinstance(leaf, Rank1) else (leaf,):
            # one pass: a NaN or inf makes the sum NaN or inf (a finite sum could overflow only
            # for gradients near the dtype's largest value)
            part_ok = xp.isfinite(xp.sum(part))
            ok = part_ok if ok is None else xp.logical_and(ok, part_ok)
    return ok if ok is not None else xp.asarray(True)


def _both_finite(be, value, other):
    """Whether the loss and ``other`` (|g|², or a 0-d bool flag) are finite: a 0-d bool array
    inside a traced program, else a Python bool (read on the host once, not an array op per check).
    """
    xp = be.xp
    flag = xp.isdtype(other.dtype, "bool")
    if be.is_tracing(value) or be.is_tracing(other):
        return xp.logical_and(xp.isfinite(value), other if flag else xp.isfinite(other))
    return math.isfinite(float(value)) and (bool(other) if flag else math.isfinite(float(other)))


def _zero_or_nan(be, ok, value):
    """The fourth result without a norm: 0 for a finite step, NaN for a refused one."""
    xp = be.xp
    if isinstance(ok, bool):
        return xp.full_like(value, 0.0 if ok else float("nan"))
    return xp.where(ok, xp.zeros_like(value), xp.full_like(value, float("nan")))


def keep_if(be, ok, new, old):
    """``new`` where ``ok`` holds, else ``old`` (a 0-d bool array is selected inside a compiled step)."""
    if isinstance(ok, bool):
        return new if ok else old
    if be.is_tracing(ok):
        return tree_map(lambda a, b: be.xp.where(ok, a, b), new, old)
    return new if bool(ok) else old


def _sq_norm(be, leaves):
    """``Σ |g|²`` over the estimate's leaves; a rank-1 tangent ``u wᵀ`` (K = 1) as ``|u|² |w|²``."""
    xp = be.xp
    dense = [g for g in leaves if not isinstance(g, Rank1)]
    total = be.sum_of_squares(dense) if dense else None
    for g in leaves:
        if isinstance(g, Rank1):
            part = xp.sum(g.u * g.u) * xp.sum(g.w * g.w)
            total = part if total is None else total + part
    return total
