"""Reverse mode, and the forward-gradient family (Baydin et al. 2022)."""

from __future__ import annotations

import contextlib
import math

import numpy as np

from duogard.backend import loaded_backends
from duogard.backend.authoring import check_generator
from duogard.grad._base import Estimator, FlatView, ForwardModeError, check_bool, params_backend, register
from duogard.grad._rules import plan as _rules_plan
from duogard.grad._rules import sequential_loss_jvp
from duogard.tree import Rank1, tree_leaves, tree_map

__all__ = [
    "Forward",
    "ForwardExact",
    "dense_tangents",
    "draw_leaf_tangent",
    "draw_leaf_tangents",
    "forward_mode_errors",
    "jvp_loss",
    "check_loss",
]

_DISTRIBUTIONS = ("normal", "rademacher")
_TANGENTS = ("dense", "rank1")
_JVP_PATHS = ("auto", "framework", "rules")


@contextlib.contextmanager
def forward_mode_errors(method: str, be=None):
    """Turn a framework's forward-mode failures into a :class:`ForwardModeError` naming the cause
    (``be.forward_mode_cause`` reads them; without ``be``, every loaded backend's).
    """
    try:
        yield
    except ForwardModeError:
        raise
    except Exception as exc:
        owners = (be,) if be is not None else loaded_backends()
        cause = next((c for c in (b.forward_mode_cause(exc) for b in owners) if c is not None), None)
        if cause is None:
            raise
        raise ForwardModeError(
            f"{method}: cannot compute a forward gradient: {cause}. Use --grad backprop for "
            f"this loss. Framework error: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        ) from exc


def check_loss(be, value, method: str):
    """``value``, a loss, after checking it is a 0-d floating-point array.

    An integer loss has no gradient (torch would train on a zero gradient without a word, JAX
    fails deep inside), and a non-scalar loss has no single directional derivative (forward mode
    failed on a reshape): both are refused here, naming what came, on every backend.
    """
    shape = tuple(getattr(value, "shape", ()))
    if shape:
        raise ValueError(
            f"{method}: the loss must be a scalar (0-d), got an array of shape {shape}; reduce it "
            "(e.g. its mean) in the loss function"
        )
    dtype = getattr(value, "dtype", None)
    name = be.dtype_name(dtype) if dtype is not None and be.is_array(value) else type(value).__name__
    if not name.startswith(("float", "bfloat")):
        raise TypeError(
            f"{method}: the loss must be a floating-point scalar to be differentiated, got {name}; an "
            "integer-valued loss (a count, an argmax) has no gradient: compute it in floating point"
        )
    return value


def jvp_loss(be, loss_fn, params, batch, tangent, method="forward"):
    """``(loss, ∇f·v)`` from one JVP of ``loss_fn(·, batch)`` at ``params`` along ``tangent``."""
    with forward_mode_errors(method, be):
        return be.jvp(lambda p: check_loss(be, loss_fn(p, batch), method), (params,), (tangent,))


def _positive(name: str, value, kind=int, method: str = "forward"):
    if not isinstance(value, (int, float, np.integer, np.floating)):  # a string, None, ...
        raise TypeError(
            f"{method}: {name} must be a positive {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value <= 0
        or (kind is int and int(value) != value)
    ):
        raise ValueError(f"{method}: {name} must be a positive {kind.__name__}, got {value!r}")
    return kind(value)


@register("forward")
class Forward(Estimator):
    """The forward gradient ``g = (∇f·v) v`` (Baydin et al. 2022), from forward-mode JVPs only.

    Args:
        num_tangents: K (default 1): the mean of K estimates, from one pass: duogard's rules
            carry the K tangents together (one stacked product per layer), the framework's
            jvp batches them with vmap; either way the primal is computed once.
        distribution: ``"normal"`` (default) or ``"rademacher"`` (random signs: cheaper to
            draw, and lower variance: E‖g‖² = (n+2)‖∇f‖² for normal tangents, n‖∇f‖² for
            Rademacher ones, with n the number of parameters, since ‖v‖² = n exactly).
        orthogonal: the K tangents are orthonormal (a Haar-random frame) scaled by √n, so the
            estimate stays unbiased; with K = n it is the exact gradient.
        projection: the least-squares projection of the gradient onto the span of the K
            tangents, ``Vᵀ(VVᵀ)⁻¹Vᵀ∇f`` (FROG-style); with K = n it is the exact gradient. Not
            unbiased (it is a projection).
        jvp: ``"framework"`` (``jax.jvp`` / ``torch.func.jvp``, any loss), ``"rules"``
            (duogard's hand-written forward rules for its own Sequential layers and losses, see
            :mod:`duogard.grad._rules`), or ``"auto"`` (default): the rules where they cover the
            loss and the model has no convolution, when the backend's generic forward AD is the
            slower one (``be.fast_jvp_rules``: torch) or K > 1 (the rules serve the K tangents
            of a layer with one matrix product, where ``vmap`` of the framework's jvp makes K
            batched ones: 0.56x the time for K=16 on the MLP on JAX); the framework's jvp
            otherwise. Both give the same numbers (checked in the tests).
        tangents: ``"dense"`` (default: every entry of every leaf drawn) or ``"rank1"``: each
            leaf with two or more axes (a Linear weight ``(out, in)``, a Conv2d kernel ``(out,
            in, kh, kw)``) gets the tangent ``u wᵀ`` (``u ⊗ k`` for a kernel) with independent
            factors ``u`` (out numbers) and ``w`` (the rest) of ``distribution``; other leaves
            (biases) stay dense. ``E[v vᵀ] = I`` still holds, so the estimate stays unbiased;
            the draw is ``out + in`` numbers per weight instead of ``out·in``, and duogard's
            forward rules carry the factors through the model (``x·w`` then ``uᵀ``: no
            parameter-sized tangent product) and the SGD update is a rank-1 update. Second
            moment: ``E‖g‖² = P‖∇f‖² + Σ_l e_l ‖∇_l f‖²`` with ``e_l = 2m_l + 2n_l + 4`` for a
            rank-1 normal leaf of shape ``(m_l, n_l)`` (2 for a dense normal leaf; 0 for
            Rademacher factors, whose ‖v‖² = P exactly). Where the framework's jvp must be
            used (other losses), ``u wᵀ`` is formed and passed dense: the same numbers. Not
            with ``orthogonal``.
        generator: ``"portable"`` (default: duogard's Philox generator, the same tangents on
            every backend for the same key) or ``"native"`` (the framework's own generator).
        lean: used the ordinary way it changes nothing; in :class:`duogard.train.Trainer` /
            :func:`duogard.fit` with a momentum-free :func:`duogard.optim.sgd` it selects the
            update strategy ``"sgd-lean"`` (:class:`duogard.grad.LeanStep`): layer by layer,
            each tangent drawn twice (for the JVP, then for an in-place update) and never the
            whole tangent or gradient at once, so the step's memory stays flat in depth. For a
            Sequential of duogard layers; not with ``orthogonal`` or ``projection``.

    Tangents: leaf i's ``(K, *shape)`` tangent is drawn from ``fold_in(key, i)``
    (:meth:`tangent_tree`). :meth:`sample` returns them as one flat ``(K, n)`` array (n =
    number of parameters) so parity runs can share it, and :meth:`estimate` takes that array.
    Subclasses change the tangents by overriding :meth:`tangent_tree` and the estimate by
    overriding :meth:`estimate_tree` (then also :attr:`factored_form`).
    """

    stochastic = True

    def __init__(
        self,
        *,
        num_tangents: int = 1,
        distribution: str = "normal",
        orthogonal: bool = False,
        projection: bool = False,
        jvp: str = "auto",
        tangents: str = "dense",
        generator: str = "portable",
        lean: bool = False,
    ):
        self.num_tangents = _positive("num_tangents", num_tangents)
        if tangents not in _TANGENTS:
            raise ValueError(f"forward: tangents must be one of {_TANGENTS}, got {tangents!r}")
        self.tangents = tangents
        try:
            self.generator = check_generator(generator)
        except ValueError as exc:
            raise ValueError(f"forward: {exc}") from None
        if jvp not in _JVP_PATHS:
            raise ValueError(f"forward: jvp must be one of {_JVP_PATHS}, got {jvp!r}")
        self.jvp = jvp
        if distribution not in _DISTRIBUTIONS:
            raise ValueError(f"forward: distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}")
        self.distribution = distribution
        self.orthogonal = check_bool("forward", "orthogonal", orthogonal)
        self.projection = check_bool("forward", "projection", projection)
        self.lean = check_bool("forward", "lean", lean)
        if self.tangents == "rank1" and self.orthogonal:
            raise ValueError(
                "forward: orthogonal=True turns the K tangents into an orthonormal frame, which is not "
                "rank-1 per leaf; use tangents='dense' with it"
            )
        if self.lean and (self.orthogonal or self.projection):
            raise ValueError(
                "forward: lean=True draws each leaf's tangent on its own; it does not combine "
                f"with orthogonal=True or projection=True (got orthogonal={orthogonal!r}, "
                f"projection={projection!r})"
            )

    # ---------------------------------------------------------------- the two hooks
    def tangent_tree(self, params, key):
        """The K tangents of ``key`` as a params-shaped pytree with a leading K axis.

        Leaf i's ``(K, *shape)`` tangent is drawn from ``fold_in(key, i)`` as one contiguous
        array, or as a :class:`duogard.tree.Rank1` with rank-1 tangents
        (:func:`draw_leaf_tangent`, the lean step's draw too); with ``orthogonal`` the
        whole ``(K, n)`` set is then turned into a scaled orthonormal frame. Override it (and
        only it) to change the tangents: :meth:`sample`, ``__call__`` and :meth:`factored` all
        draw through it.

        Args:
            params: the parameters (a pytree of the backend's arrays).
            key: the step's random key.

        Returns:
            A pytree shaped like ``params`` whose leaves have a leading axis of K.
        """
        be = params_backend(params)
        leaves = tree_leaves(params)
        k = self.num_tangents
        drawn = iter(
            draw_leaf_tangents(
                be,
                self.distribution,
                be.fold_in_many(key, range(len(leaves))),
                k,
                leaves,
                rank1=self.tangents == "rank1",
                generator=self.generator,
            )
        )
        # by tree_map, not a treedef kept across the draw: torch.compile breaks the graph at the
        # host draws, and its pytree polyfill fails to unflatten a dict treedef made before a break
        tree = tree_map(lambda _: next(drawn), params)
        if not self.orthogonal:
            return tree
        flat = FlatView.of(params)
        if k > flat.size:
            raise ValueError(
                f"forward: orthogonal=True needs num_tangents <= number of parameters ({flat.size}), got {k}"
            )
        frame = _orthonormal_rows(be, flat.flatten(be, tree, leading=(k,))) * math.sqrt(flat.size)
        return flat.unflatten(be, frame, leading=(k,))

    def estimate_tree(self, loss_fn, params, batch, vtree):
        """``(loss, g)`` from tangents given as a params-shaped pytree with a leading K axis.

        Args:
            loss_fn: ``loss_fn(params, batch) -> scalar``.
            params: the parameters.
            batch: passed to ``loss_fn``.
            vtree: the tangents (:meth:`tangent_tree`'s form).

        Returns:
            The loss and the estimate, shaped like ``params``.
        """
        loss, ds = self._directional(loss_fn, params, batch, vtree)
        return loss, self.combine(ds, vtree)

    def directional(self, loss_fn, params, batch, key):
        """``(loss, ds, vtree)``: the tangents of ``key`` and the K directional derivatives
        ``ds[i] = ∇f·v_i`` along them (shape ``(K,)``), without forming the estimate.

        With :meth:`combine` it splits ``__call__`` in two, for data-parallel training: each
        rank computes ``loss`` and ``ds`` on its shard of the batch, the ranks average these
        K + 1 numbers, and each rank combines the mean with the tangents it drew itself.
        ``combine(*directional(...)[1:])`` is bitwise ``__call__``'s estimate.
        """
        self._check_key(key)
        vtree = self.tangent_tree(params, key)
        loss, ds = self._directional(loss_fn, params, batch, vtree)
        return loss, ds, vtree

    def combine(self, ds, vtree):
        """The estimate from the K directional derivatives ``ds`` along the tangents ``vtree``
        (:meth:`tangent_tree`'s form): the mean of ``ds[i] v_i``, or with ``projection`` the
        least-squares combination. Linear in ``ds``: the estimate of averaged ``ds`` is the
        average of the estimates.
        """
        xp, k = params_backend(ds).xp, self.num_tangents

        def like(c, t):
            # in the tangent's (the leaf's) dtype: float16 params with float32 data give float32
            # directional derivatives, and the gradient keeps the params' dtype (as backprop's)
            dtype = (t.u if isinstance(t, Rank1) else t).dtype
            return c if c.dtype == dtype else xp.astype(c, dtype)

        if k == 1 and not self.projection:
            d = ds[0]
            return tree_map(lambda t: like(d, t) * (t.dense(xp) if isinstance(t, Rank1) else t)[0], vtree)
        if self.projection:
            # the Gram matrix of the K flat tangents, summed over the leaves
            gram = sum(_gram(xp, t, k) for t in tree_leaves(vtree))
            gram = gram if gram.dtype == ds.dtype else xp.astype(gram, ds.dtype)
            weights, divisor = xp.linalg.solve(gram, ds[:, None])[:, 0], 1
        else:
            weights, divisor = ds, k

        def combine(t):
            c = like(weights, t)
            if isinstance(t, Rank1):  # sum_k c_k u_k w_kᵀ: one (m, K) by (K, n) product
                return t.combine(xp, c) / divisor
            return xp.reshape(xp.matmul(c[None, :], xp.reshape(t, (k, -1)))[0], t.shape[1:]) / divisor

        return tree_map(combine, vtree)

    # ---------------------------------------------------------------- the estimator protocol
    def sample(self, loss_fn, params, batch, key):
        """The tangents of :meth:`tangent_tree` as one flat ``(K, n)`` array (to share them)."""
        be = params_backend(params)
        vtree = dense_tangents(be, self.tangent_tree(params, key))
        return FlatView.of(params).flatten(be, vtree, leading=(self.num_tangents,))

    def estimate(self, loss_fn, params, batch, tangents):
        """:meth:`estimate_tree` from the flat ``(K, n)`` tangents that :meth:`sample` gives."""
        be = params_backend(params)
        flat = FlatView.of(params)
        k = self.num_tangents
        if tuple(tangents.shape) != (k, flat.size):
            raise ValueError(
                f"forward: tangents must have shape (num_tangents, n) = {(k, flat.size)}, "
                f"got {tuple(tangents.shape)}"
            )
        return self.estimate_tree(loss_fn, params, batch, flat.unflatten(be, tangents, leading=(k,)))

    def __call__(self, loss_fn, params, batch, key=None):
        self._check_key(key)
        return self.estimate_tree(loss_fn, params, batch, self.tangent_tree(params, key))

    @property
    def factored_form(self) -> bool:
        """Whether the estimate is one 0-d ``d`` times the tangent ``v`` (K = 1, no projection).

        Then :meth:`factored` gives ``(loss, d, v)`` and the Trainer's update strategy
        ``"sgd-factored"`` applies ``p -= lr d v`` without writing the gradient ``d v``. A
        subclass that overrides :meth:`estimate_tree` must make this False (or keep
        :meth:`factored` consistent with it).
        """
        return self.num_tangents == 1 and not self.projection

    def factored(self, loss_fn, params, batch, key=None):
        """``(loss, d, v)`` with the estimate ``d * v`` when :attr:`factored_form`, else None.

        The same draw and JVP as ``__call__``: ``d * v`` is exactly its estimate for this key.
        """
        if not self.factored_form:
            return None
        self._check_key(key)
        vtree = self.tangent_tree(params, key)
        loss, d = self._directional(loss_fn, params, batch, vtree)
        return loss, d[0], tree_map(lambda t: t if isinstance(t, Rank1) else t[0], vtree)

    def _directional(self, loss_fn, params, batch, vtree):
        """``(loss, ds)``: the K directional derivatives ``ds[i] = ∇f·v_i`` (shape ``(K,)``)."""
        be = params_backend(params)
        k = self.num_tangents
        rules = self._rules(loss_fn, batch, be)
        if rules is not None:
            with forward_mode_errors("forward", be):
                return sequential_loss_jvp(be, *rules, params, vtree, batch, k)
        vtree = dense_tangents(be, vtree)  # the framework's jvp takes dense tangents
        if k == 1:
            loss, d = jvp_loss(be, loss_fn, params, batch, tree_map(lambda t: t[0], vtree))
            return loss, be.xp.reshape(d, (1,))
        losses, ds = be.vmap(lambda t: jvp_loss(be, loss_fn, params, batch, t))(vtree)
        return losses[0], ds

    def _rules(self, loss_fn, batch, be):
        """The hand-written rules' plan when ``jvp`` selects them for this loss, else None."""
        rank1 = self.tangents == "rank1"
        many = self.num_tangents > 1
        if self.jvp == "rules" or (self.jvp == "auto" and (be.fast_jvp_rules or rank1 or many)):
            # the rules win for Linear layers; for convolutions torch's own forward AD is as
            # fast or faster with dense tangents, so "auto" keeps it there (duogard bench shows
            # both). Rank-1 tangents take the rules wherever they cover the loss, on every
            # backend: only they carry the factors (the frameworks' jvp takes dense tangents);
            # K > 1 takes them on every backend too: one stacked product for the K tangents
            rules = _rules_plan(loss_fn, batch, convolutions=self.jvp == "rules" or rank1)
            if rules is None and self.jvp == "rules":
                raise ValueError(
                    "forward: jvp='rules' covers supervised(Sequential of duogard layers, "
                    "cross_entropy or mse) losses only; use jvp='framework' for this loss"
                )
            return rules
        return None


def draw_leaf_tangent(
    be,
    kind: str,
    key,
    k: int,
    shape: tuple,
    *,
    dtype,
    device,
    rank1: bool = False,
    generator: str = "portable",
):
    """One leaf's ``(k, *shape)`` tangent from its own key: what :func:`draw_leaf_tangents`
    draws for that leaf, drawn alone (the lean step draws a layer's tangents this way).

    Dense: the leaf's ``k`` rows of ``prod(shape)`` numbers (``be.draw_rows`` with one key).
    With ``rank1`` and a leaf of two or more axes ``(m, *rest)``: a
    :class:`duogard.tree.Rank1` whose factors are the key's ``k`` rows of ``m + prod(rest)``
    numbers, ``u`` (``(k, m)``) the first ``m`` of each row and ``w`` (``(k, *rest)``) the rest.
    """
    block = be.draw_rows(
        kind, [key], [_leaf_width(shape, rank1)], k, dtype=dtype, device=device, generator=generator
    )
    return _leaf_tangent(be, block, k, shape, rank1)


def draw_leaf_tangents(
    be, kind: str, keys, k: int, leaves, *, rank1: bool = False, generator: str = "portable"
):
    """Every leaf's tangent (:func:`draw_leaf_tangent` of ``keys[i]`` for leaf ``i``), the
    leaves grouped by dtype and device into one ``be.draw_rows`` each: the portable generator
    then draws all small leaves in one pass (a compiled step carries one pass of the rounds,
    not one per leaf; torch makes one host draw a step, not one per leaf).
    """
    if generator != "portable":
        # the framework's own generators number their draws by shape (torch's native signs come
        # 64 to a word): only the portable one gives a (k, width) draw as a (1, k * width) one
        return [
            draw_leaf_tangent(
                be,
                kind,
                keys[i],
                k,
                tuple(leaf.shape),
                dtype=leaf.dtype,
                device=be.device_of(leaf),
                rank1=rank1,
                generator=generator,
            )
            for i, leaf in enumerate(leaves)
        ]
    groups: dict = {}
    for i, leaf in enumerate(leaves):
        groups.setdefault((str(leaf.dtype), str(be.device_of(leaf))), []).append(i)
    out: list = [None] * len(leaves)
    for idx in groups.values():
        first = leaves[idx[0]]
        widths = [_leaf_width(tuple(leaves[i].shape), rank1) for i in idx]
        # one row of every leaf's k * width numbers: key j's (k, width) draw, row-major, is its
        # (1, k * width) draw, so each leaf's tangent is a contiguous slice of the row
        row = be.draw_rows(
            kind,
            [keys[i] for i in idx],
            [k * w for w in widths],
            1,
            dtype=first.dtype,
            device=be.device_of(first),
            generator=generator,
        )[0]
        start = 0
        for i, width in zip(idx, widths):
            block = be.xp.reshape(row[start : start + k * width], (k, width))
            out[i] = _leaf_tangent(be, block, k, tuple(leaves[i].shape), rank1)
            start += k * width
    return out


def _leaf_width(shape: tuple, rank1: bool) -> int:
    """Numbers per tangent of a leaf of ``shape``: its size, or ``m + prod(rest)`` rank-1."""
    if rank1 and len(shape) >= 2:
        return int(shape[0]) + math.prod(shape[1:])
    return math.prod(shape)


def _leaf_tangent(be, block, k: int, shape: tuple, rank1: bool):
    """A leaf's tangent from its ``(k, width)`` block of numbers."""
    if rank1 and len(shape) >= 2:
        m = int(shape[0])
        return Rank1(block[:, :m], be.xp.reshape(block[:, m:], (k, *shape[1:])))
    return be.xp.reshape(block, (k, *shape))


def dense_tangents(be, vtree):
    """``vtree`` with every :class:`duogard.tree.Rank1` leaf formed as its dense array."""
    return tree_map(lambda t: t.dense(be.xp) if isinstance(t, Rank1) else t, vtree)


def _gram(xp, t, k: int):
    """The ``(K, K)`` inner products of a leaf's K tangents."""
    if isinstance(t, Rank1):
        return t.gram(xp)
    r = xp.reshape(t, (k, -1))
    return xp.matmul(r, xp.matrix_transpose(r))


def _orthonormal_rows(be, g):
    """Rows of a Haar-random orthonormal frame from Gaussian ``g`` (K, n), K <= n."""
    xp = be.xp
    q, r = xp.linalg.qr(xp.matrix_transpose(g))  # (n, K), (K, K)
    signs = xp.sign(xp.linalg.diagonal(r))
    signs = xp.where(signs == 0, xp.ones_like(signs), signs)
    return xp.matrix_transpose(q * signs[None, :])


@register("forward-exact")
class ForwardExact(Estimator):
    """The exact gradient by forward mode: one JVP per coordinate, ``chunk_size`` at a time (vmap).

    A reference for small models (its cost grows with the number of parameters).
    """

    def __init__(self, *, chunk_size: int = 256):
        self.chunk_size = _positive("chunk_size", chunk_size, method="forward-exact")

    def estimate(self, loss_fn, params, batch, tangents=None):
        be = params_backend(params)
        xp = be.xp
        flat = FlatView.of(params)
        leaf = tree_leaves(params)[0]
        n, dev = flat.size, be.device_of(leaf)
        cols = xp.arange(n, device=dev)
        parts, loss = [], None
        for start in range(0, n, self.chunk_size):
            rows = xp.arange(start, min(start + self.chunk_size, n), device=dev)
            eye = xp.astype(rows[:, None] == cols[None, :], leaf.dtype)
            vtree = flat.unflatten(be, eye, leading=(eye.shape[0],))
            losses, ds = be.vmap(lambda t: jvp_loss(be, loss_fn, params, batch, t, "forward-exact"))(vtree)
            loss = losses[0] if loss is None else loss
            parts.append(ds)
        return loss, flat.unflatten(be, xp.concat(parts))
