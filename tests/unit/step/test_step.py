"""The one step builder: every way of training reaches it, the strategy is stated where it is
chosen, the batch names its parts, and a collective is the reduce part between estimate and update.
"""

from __future__ import annotations

import numpy as np
import pytest

import duogard as dg
from duogard import nn, optim
from duogard.step import Batch, Step, build_step, choose_update
from duogard.tree import tree_leaves, tree_map

from helpers import one_rank_env


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(16), nn.relu, nn.Linear(10))


@pytest.fixture
def built(monkeypatch):
    """Counts the :class:`Step` objects made (only :func:`build_step` makes them)."""
    made = []
    init = Step.__init__

    def counting(self, *args, **kw):
        made.append(kw.get("strategy"))
        init(self, *args, **kw)

    monkeypatch.setattr(Step, "__init__", counting)
    return made


def _np(be, tree):
    return tree_map(be.to_numpy, tree)


def test_trainer_fit_parity_and_lean_reach_the_builder(be, digits, built):
    model = _mlp()
    p0 = model.init(0, digits.example_input)
    tr = dg.Trainer(model, estimator=dg.estimator("forward"), optimizer=optim.sgd(0.01), backend=be.name)
    assert isinstance(tr.step, Step) and built == ["sgd-factored"]
    seen = []
    dg.fit(model, p0, digits, trainer=tr, steps=2, callbacks=[lambda r: None, _Spy(seen)])
    assert seen == [tr.step]  # fit runs the Trainer's built step
    lean = dg.Trainer(model, estimator="forward", optimizer=optim.sgd(0.01), update="lean", backend=be.name)
    assert lean.step.strategy == "sgd-lean" and built[-1] == "sgd-lean"
    n = len(built)
    dg.parity.compare_backends(
        model, "cross_entropy", optim.adam(1e-3), "forward", digits, steps=1, calibrate=False
    )
    assert built[n:] == ["optimizer", "optimizer"]  # one step per side, the Trainer's strategy


class _Spy(dg.train.Callback):
    def __init__(self, seen):
        self.seen = seen

    def on_fit_start(self, run):
        self.seen.append(run.step)


def test_forward_grad_reaches_the_builder(built):
    torch = pytest.importorskip("torch")
    m = torch.nn.Linear(4, 3).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    keys = dg.torch.KeySequence(seed=0)
    loss = dg.torch.forward_grad_(
        m, lambda mod, b: torch.nn.functional.cross_entropy(mod(b[0]), b[1]), (x, y), key=keys
    )
    assert built == ["none"] and loss.ndim == 0
    # the estimate is (∇f·v) v for the key's tangent: check against the exact gradient's projection
    g = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    exact = [p.grad for p in m.parameters()]
    cos = sum(float((a * b).sum()) for a, b in zip(g, exact))
    assert cos > 0  # E[(∇f·v)v]·∇f = ‖∇f‖² > 0, and every single draw gives (∇f·v)² ≥ 0


def test_data_parallel_builds_the_trainers_step_with_its_collective(digits, built, monkeypatch):
    """fit(distributed=...) inserts the collective as the step's reduce part: no swapped trainer."""
    be = one_rank_env(monkeypatch)  # one rank, no group joined
    model = _mlp()
    p0 = model.init(0, digits.example_input)
    tr = dg.Trainer(
        model, estimator=dg.estimator("forward", num_tangents=2), optimizer=optim.sgd(0.01), backend="torch"
    )
    reduced = []
    dp = dg.train.DataParallel()
    real = dp.reduce
    monkeypatch.setattr(dp, "reduce", lambda loss, ds: reduced.append(tuple(ds.shape)) or real(loss, ds))
    seen = []
    r = dg.fit(model, p0, digits, trainer=tr, steps=3, distributed=dp, callbacks=[_Spy(seen)])
    assert seen[0] is not tr.step and seen[0].exchange == "directional" and built[-1] == "sgd-in-place"
    assert reduced == [(2,)] * 3 and dp.numbers_per_step == 3  # K + 1 numbers, once per step
    single = dg.fit(model, p0, digits, trainer=tr, steps=3, callbacks=[])
    for a, b in zip(tree_leaves(_np(be, r.params)), tree_leaves(_np(be, single.params))):
        np.testing.assert_array_equal(a, b)  # one rank: the single-process run, bitwise
    again = dg.fit(model, p0, digits, trainer=tr, steps=1, distributed=dg.train.DataParallel(), callbacks=[])
    assert again.step == 1 and tr.build_step(collective=dp) is seen[0]  # built once per configuration


@pytest.mark.parametrize("update", ["sgd-in-place", "optimizer"])
def test_a_stated_strategy_gives_the_automatic_ones_numbers(be, digits, update):
    model = _mlp()
    p0 = model.init(0, digits.example_input)
    runs = {}
    for u in ("auto", update):
        tr = dg.Trainer(model, estimator="forward", optimizer=optim.sgd(0.01), update=u, backend=be.name)
        runs[u] = (tr.update_strategy, dg.fit(model, p0, digits, trainer=tr, steps=4, callbacks=[]))
    assert runs["auto"][0] == "sgd-factored" and runs[update][0] == update
    for a, b in zip(
        tree_leaves(_np(be, runs["auto"][1].params)), tree_leaves(_np(be, runs[update][1].params))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_lean_stated_on_the_trainer_is_the_lean_estimator(be, digits):
    model = _mlp()
    p0 = model.init(0, digits.example_input)
    stated = dg.Trainer(model, estimator="forward", optimizer=optim.sgd(0.01), update="lean", backend=be.name)
    flagged = dg.Trainer(
        model, estimator=dg.estimator("forward", lean=True), optimizer=optim.sgd(0.01), backend=be.name
    )
    a = dg.fit(model, p0, digits, trainer=stated, steps=3, callbacks=[])
    b = dg.fit(model, p0, digits, trainer=flagged, steps=3, callbacks=[])
    assert a.update_strategy == b.update_strategy == "sgd-lean"
    for x, y in zip(tree_leaves(_np(be, a.params)), tree_leaves(_np(be, b.params))):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "update, opt, est, match",
    [
        ("lean", lambda: optim.adam(1e-3), "forward", "without momentum"),
        (
            "sgd-factored",
            lambda: optim.sgd(0.1),
            lambda: dg.estimator("forward", num_tangents=4),
            "one tangent",
        ),
        ("sgd-lean", lambda: optim.sgd(0.1), "backprop", "forward estimator"),
        ("in-backward", lambda: optim.sgd(0.1), "forward", r"needs estimator\('backprop'\)"),
        ("sgd-in-backward", lambda: optim.adam(1e-3), "backprop", "without momentum"),
        ("fused", lambda: optim.sgd(0.1), "forward", "update must be 'auto' or one of"),
        ("optimizer", lambda: None, "forward", "needs an optimizer"),
    ],
)
def test_a_strategy_that_cannot_run_is_refused(update, opt, est, match):
    est = dg.estimator(est) if isinstance(est, str) else est()
    with pytest.raises(ValueError, match=match):
        choose_update(opt(), est, update)


def test_in_backward_gives_way_where_the_whole_gradient_is_needed(be):
    """A parity run compares the gradient, ``forward_grad_`` returns it and a data-parallel step
    reduces it (next test): the in-backward strategy becomes the in-place one there."""
    loss_fn, est, opt = dg.grad.supervised(_mlp()), dg.estimator("backprop"), optim.sgd(0.1)
    kw = dict(update="in-backward", compile=False)
    assert build_step(be, loss_fn, est, opt, **kw).strategy == "sgd-in-backward"
    for more in ({"tangents": "given"}, {"return_estimate": True}):
        assert build_step(be, loss_fn, est, opt, **kw, **more).strategy == "sgd-in-place"


def test_in_backward_runs_data_parallel_as_the_in_place_step(digits, monkeypatch):
    be = one_rank_env(monkeypatch)  # one rank, no group joined
    model = _mlp()
    p0 = model.init(0, digits.example_input)
    tr = dg.Trainer(model, optimizer=optim.sgd(0.01), backend="torch")
    assert tr.update_strategy == "sgd-in-backward"
    seen = []
    dp = dg.train.DataParallel()
    r = dg.fit(model, p0, digits, trainer=tr, steps=3, distributed=dp, callbacks=[_Spy(seen)])
    assert seen[0].strategy == "sgd-in-place" and seen[0].exchange == "gradient"
    single = dg.fit(model, p0, digits, trainer=tr, steps=3, callbacks=[])
    for a, b in zip(tree_leaves(_np(be, r.params)), tree_leaves(_np(be, single.params))):
        np.testing.assert_array_equal(a, b)  # one rank: the single-process (in-backward) run, bitwise


def test_the_batch_names_its_parts(be, digits):
    x, y, key = be.asarray(np.ones((2, 3))), be.asarray(np.array([0, 1])), be.key(0)
    plain, train = Batch(x, y), Batch(x, y, key)
    assert len(plain) == 2 and plain.model_key is None and plain.inputs is x and plain.targets is y
    a, b = plain  # a loss written for ``x, y = batch`` keeps working
    assert a is x and b is y and train.model_key is key and len(train) == 3
    seen = []

    def loss_fn(params, batch):
        seen.append((type(batch).__name__, batch.model_key is not None))
        return dg.losses.cross_entropy(_mlp().apply(params, batch.inputs), batch.targets)

    model = _mlp()
    p = tree_map(be.asarray, model.init(0, digits.example_input))
    step = build_step(be, loss_fn, dg.estimator("backprop"), optim.sgd(0.1), compile=False)
    xb, yb = digits.batch_at(0, 8)
    step(p, optim.sgd(0.1).init(p), be.asarray(xb), be.asarray(yb), be.key(0))
    drop = build_step(be, loss_fn, dg.estimator("backprop"), optim.sgd(0.1), train_mode=True, compile=False)
    drop(p, optim.sgd(0.1).init(p), be.asarray(xb), be.asarray(yb), be.key(0))
    assert seen == [("Batch", False), ("Batch", True)]


def test_ranks_launched_with_different_settings_are_refused_naming_them(digits, monkeypatch):
    """Rank 1 was launched with another --lr: the ranks' first collective compares a digest per
    setting, and the run stops before any step, naming the flag (it trained to diverged params)."""
    import hashlib

    be = one_rank_env(monkeypatch, 2)
    theirs = hashlib.sha256(repr(0.2).encode()).digest()

    def gather(x):  # what rank 1 sends: the same, but its "--lr" (first, sorted) is 0.2
        other = x.copy()
        if x.size > 8:
            other[:32] = np.frombuffer(theirs, dtype=np.uint8)
        return np.stack([x, other])

    monkeypatch.setattr(be, "host_all_gather", gather)
    model = _mlp()
    p0 = model.init(0, digits.example_input)
    steps = []
    dp = dg.train.DataParallel(config={"--lr": 0.1})
    with pytest.raises(
        dg.train.DistributedError, match=r"not run the same configuration: --lr \(rank\(s\) \[1\]"
    ):
        dg.fit(model, p0, digits, backend="torch", steps=2, distributed=dp, callbacks=[steps.append])
    assert steps == []  # refused before the first step

    monkeypatch.setattr(be, "host_all_gather", lambda x: np.stack([x, x[::-1].copy()]))
    with pytest.raises(dg.train.DistributedError, match="name other settings than rank 0"):
        dg.fit(model, p0, digits, backend="torch", steps=2, distributed=dg.train.DataParallel(), callbacks=[])


def test_the_configuration_digest_changes_with_each_setting(digits, monkeypatch):
    one_rank_env(monkeypatch)
    model = _mlp()
    seen = {}

    class Grab(dg.train.Callback):
        order = 2  # after DataParallel set up the run

        def __init__(self, tag, dp):
            self.tag, self.dp = tag, dp

        def on_fit_start(self, run):
            seen[self.tag] = self.dp.settings(run)

    runs = {
        "base": dict(optimizer=optim.sgd(0.1), seed=0, batch_size=16),
        "lr": dict(optimizer=optim.sgd(0.2), seed=0, batch_size=16),
        "seed": dict(optimizer=optim.sgd(0.1), seed=1, batch_size=16),
        "batch": dict(optimizer=optim.sgd(0.1), seed=0, batch_size=32),
    }
    for tag, kw in runs.items():
        dp = dg.train.DataParallel()
        params = model.init(kw["seed"], digits.example_input)
        dg.fit(
            model, params, digits, backend="torch", steps=1, distributed=dp, callbacks=[Grab(tag, dp)], **kw
        )
    base = seen["base"]
    changed = {tag: sorted(k for k in base if seen[tag][k] != base[k]) for tag in ("lr", "seed", "batch")}
    assert changed["lr"] == ["optimizer state"]
    assert changed["seed"] == ["initial parameters", "seed"]
    assert changed["batch"] == ["batch_size"]
