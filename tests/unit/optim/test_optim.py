"""duogard.optim on both backends against torch.optim, optax and NumPy formulas.

Where the references differ from each other, duogard follows torch.optim (so torch scripts
port number for number) and is compared with optax under the options that make optax compute
the same thing:

- Adam/AdamW: torch and optax (``eps_root=0``) compute the same expression, eps outside the
  square root of the bias-corrected second moment; optax.adamw's default weight_decay is 1e-4,
  torch's 1e-2 (we pass it explicitly). torch's Adam ``weight_decay`` (L2) is optax's
  ``chain(add_decayed_weights(wd), adam(...))``.
- RMSprop: optax puts eps inside the square root unless ``eps_in_sqrt=False``; its decay
  default is 0.9 (torch's alpha 0.99); its momentum accumulates ``lr * g`` (the same numbers
  for a constant learning rate only).
- Adagrad: optax puts eps inside the square root and starts the accumulator at 0.1 (torch: 0),
  and has no lr_decay (we pass it as a schedule). With an accumulator > 0, eps=1e-30 in torch
  and duogard equals eps=0 in optax.
- clip_by_global_norm: torch divides by ``norm + 1e-6``, optax by ``norm`` (duogard: ``eps``).
- cosine_decay stays at its floor after decay_steps (optax); torch's CosineAnnealingLR goes back
  up, so they are compared up to T_max.
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

import duogard as dg  # noqa: E402
from duogard import losses, nn, optim  # noqa: E402
from duogard.tree import tree_leaves, tree_map  # noqa: E402

from helpers import TOL, to_backend, to_numpy  # noqa: E402

DTYPES = ("float32", "float64")
STEPS = 20


def assert_tree_close(actual, expected, dtype, **override):
    a_leaves, e_leaves = tree_leaves(actual), tree_leaves(expected)
    assert len(a_leaves) == len(e_leaves)
    for a, e in zip(a_leaves, e_leaves):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), **{**TOL[dtype], **override})


# ----------------------------------------------------------------------------- problems


def _quadratic_loss(params, data):
    scale, target = data
    xp = dg.backend_of(params["w"]).xp
    return sum(0.5 * xp.sum(scale[k] * (params[k] - target[k]) ** 2) for k in ("b", "w"))


_MLP = nn.Sequential(nn.Linear(8), nn.tanh, nn.Linear(3))


def _mlp_loss(params, data):
    x, y = data
    return losses.cross_entropy(_MLP.apply(params, x), y)


@functools.cache
def problem(name: str, dtype: str):
    """``(params0, data, loss)`` in NumPy (data: float arrays in ``dtype``, labels int64)."""
    rng = np.random.default_rng(42)
    if name == "quadratic":
        params = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))}
        scale = {k: rng.uniform(0.2, 3.0, v.shape) for k, v in params.items()}
        target = {k: rng.normal(size=v.shape) for k, v in params.items()}
        cast = functools.partial(tree_map, lambda a: a.astype(dtype))
        return cast(params), (cast(scale), cast(target)), _quadratic_loss
    x = rng.normal(size=(16, 5)).astype(dtype)
    y = rng.integers(0, 3, size=16)
    return _MLP.init(0, x), (x, y), _mlp_loss


# ----------------------------------------------------------------------------- optimizer table

T = torch.optim
# name -> (duogard factory, torch.optim factory, optax factory or None)
CASES = {
    "sgd": (lambda: optim.sgd(0.1), lambda p: T.SGD(p, lr=0.1), lambda: optax.sgd(0.1)),
    "sgd_momentum": (
        lambda: optim.sgd(0.1, momentum=0.9),
        lambda p: T.SGD(p, lr=0.1, momentum=0.9),
        lambda: optax.sgd(0.1, momentum=0.9),
    ),
    "sgd_nesterov": (
        lambda: optim.sgd(0.1, momentum=0.9, nesterov=True),
        lambda p: T.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    ),
    "sgd_weight_decay": (
        lambda: optim.sgd(0.1, momentum=0.5, weight_decay=0.05),
        lambda p: T.SGD(p, lr=0.1, momentum=0.5, weight_decay=0.05),
        lambda: optax.chain(optax.add_decayed_weights(0.05), optax.sgd(0.1, momentum=0.5)),
    ),
    "adam": (lambda: optim.adam(0.01), lambda p: T.Adam(p, lr=0.01), lambda: optax.adam(0.01)),
    "adam_l2": (
        lambda: optim.adam(0.02, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1),
        lambda p: T.Adam(p, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
        lambda: optax.chain(optax.add_decayed_weights(0.1), optax.adam(0.02, b1=0.8, b2=0.99, eps=1e-6)),
    ),
    "adamw": (
        lambda: optim.adamw(0.01, weight_decay=0.1),
        lambda p: T.AdamW(p, lr=0.01, weight_decay=0.1),
        lambda: optax.adamw(0.01, weight_decay=0.1),
    ),
    "rmsprop": (
        lambda: optim.rmsprop(0.01),
        lambda p: T.RMSprop(p, lr=0.01),
        lambda: optax.rmsprop(0.01, decay=0.99, eps=1e-8, eps_in_sqrt=False),
    ),
    "rmsprop_centered": (
        lambda: optim.rmsprop(0.01, alpha=0.9, centered=True),
        lambda p: T.RMSprop(p, lr=0.01, alpha=0.9, centered=True),
        lambda: optax.rmsprop(0.01, decay=0.9, eps=1e-8, eps_in_sqrt=False, centered=True),
    ),
    # (with alpha=0.99 the float32 MLP run is ill-conditioned: float32 and float64 torch runs
    # differ by several times the tolerance; alpha=0.9 is well-conditioned)
    "rmsprop_momentum": (
        lambda: optim.rmsprop(0.01, alpha=0.9, momentum=0.9, weight_decay=0.01),
        lambda p: T.RMSprop(p, lr=0.01, alpha=0.9, momentum=0.9, weight_decay=0.01),
        lambda: optax.chain(
            optax.add_decayed_weights(0.01), optax.rmsprop(0.01, decay=0.9, eps_in_sqrt=False, momentum=0.9)
        ),
    ),
    "adagrad": (
        lambda: optim.adagrad(0.1, lr_decay=0.05, initial_accumulator_value=0.1, eps=1e-30),
        lambda p: T.Adagrad(p, lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1, eps=1e-30),
        lambda: optax.adagrad(lambda t: 0.1 / (1 + 0.05 * t), initial_accumulator_value=0.1, eps=0.0),
    ),
    # torch's defaults (accumulator 0, eps 1e-10 outside the root): optax has no equivalent
    "adagrad_torch_defaults": (
        lambda: optim.adagrad(0.1, weight_decay=0.01),
        lambda p: T.Adagrad(p, lr=0.1, weight_decay=0.01),
        None,
    ),
}


@functools.cache
def gradient_fn(backend: str, name: str, dtype: str):
    """``(params, data) -> (loss, grads)`` on a backend; jitted once per problem on JAX (the
    optimizers run eagerly around it; test_jitted_jax_step_compiles_once jits whole steps)."""
    be = dg.backend(backend)
    return be.jit(be.value_and_grad(problem(name, dtype)[2]))


def run_duogard(be, tx, name, dtype, steps=STEPS):
    params0, data, _ = problem(name, dtype)
    params, data = to_backend(be, params0), to_backend(be, data)
    value_and_grad = gradient_fn(be.name, name, dtype)
    state = tx.init(params)
    for _ in range(steps):
        _, grads = value_and_grad(params, data)
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
    return to_numpy(be, params), state


@functools.cache
def torch_reference(case: str, name: str, dtype: str):
    """torch.optim's trajectory, gradients from torch.autograd."""
    params0, data, loss = problem(name, dtype)
    params = tree_map(lambda a: torch.tensor(a).requires_grad_(True), params0)
    data = tree_map(torch.as_tensor, data)
    opt = CASES[case][1](tree_leaves(params))
    for _ in range(STEPS):
        opt.zero_grad()
        loss(params, data).backward()
        opt.step()
    return tree_map(lambda t: t.detach().numpy(), params)


@functools.cache
def optax_reference(case: str, name: str, dtype: str):
    """optax's trajectory, gradients from jax.grad (the function duogard's JAX run uses)."""
    params0, data, _ = problem(name, dtype)
    params, data = tree_map(jnp.asarray, params0), tree_map(jnp.asarray, data)
    tx = CASES[case][2]()
    state = tx.init(params)
    value_and_grad = gradient_fn("jax", name, dtype)
    for _ in range(STEPS):
        updates, state = tx.update(value_and_grad(params, data)[1], state, params)
        params = optax.apply_updates(params, updates)
    return tree_map(np.asarray, params)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["quadratic", "mlp"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_optimizer_matches_torch_and_optax(be, case, name, dtype):
    params0 = problem(name, dtype)[0]
    got, state = run_duogard(be, CASES[case][0](), name, dtype)
    for leaf in tree_leaves(got):
        assert leaf.dtype == np.dtype(dtype)
    for leaf in tree_leaves(state):  # float state stays in the params' dtype (no float64 creep)
        assert str(leaf.dtype).removeprefix("torch.") in (dtype, "int32")
    moved = max(np.abs(a - b).max() for a, b in zip(tree_leaves(got), tree_leaves(params0)))
    assert moved > 1e-3, "the optimizer barely moved: the comparison would prove nothing"
    assert_tree_close(got, torch_reference(case, name, dtype), dtype)
    if CASES[case][2] is not None:
        assert_tree_close(got, optax_reference(case, name, dtype), dtype)
    assert int(optim.step_count(state)) == STEPS


# ----------------------------------------------------------------------------- schedules

SCHEDULES = {
    # name -> (duogard schedule, NumPy formula, torch scheduler factory)
    "constant": (
        optim.constant_schedule(0.3),
        lambda t: 0.3 + 0 * t,
        lambda o: T.lr_scheduler.LambdaLR(o, lambda s: 1.0),
    ),
    "exponential": (
        optim.exponential_decay(0.3, rate=0.07),
        lambda t: 0.3 * np.exp(-0.07 * t),
        lambda o: T.lr_scheduler.ExponentialLR(o, gamma=math.exp(-0.07)),
    ),
    "step": (
        optim.step_decay(0.3, step_size=7, gamma=0.5),
        lambda t: 0.3 * 0.5 ** np.floor(t / 7),
        lambda o: T.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
    ),
    "cosine": (
        optim.cosine_decay(0.3, decay_steps=30, alpha=0.1),
        lambda t: 0.03 + 0.27 * 0.5 * (1 + np.cos(np.pi * np.minimum(t, 30) / 30)),
        lambda o: T.lr_scheduler.CosineAnnealingLR(o, T_max=30, eta_min=0.03),
    ),
    "warmup_cosine": (
        optim.warmup_cosine_decay(0.3, warmup_steps=5, decay_steps=30, init_value=0.01, end_value=0.02),
        lambda t: np.where(
            t < 5, 0.01 + 0.29 * t / 5, 0.02 + 0.28 * 0.5 * (1 + np.cos(np.pi * np.minimum(t - 5, 25) / 25))
        ),
        None,
    ),
}


def _torch_scheduler_lrs(make, steps, lr0=0.3):
    opt = T.SGD([torch.zeros(1, requires_grad=True)], lr=lr0)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_against_formula_and_torch(be, name):
    schedule, formula, torch_make = SCHEDULES[name]
    steps = np.arange(31)  # up to T_max: torch's cosine goes back up afterwards
    expected = formula(steps.astype(np.float64))
    python = np.array([schedule(int(t)) for t in steps])
    assert all(isinstance(schedule(int(t)), float) for t in steps[:3])
    np.testing.assert_allclose(python, expected, rtol=1e-12, atol=0)
    for dtype, tol in (("float64", 1e-12), ("float32", 1e-6)):  # the optimizers pass float steps
        arr = be.asarray(steps.astype(dtype))  # (+ 0 * arr: the constant schedule gives a float)
        np.testing.assert_allclose(be.to_numpy(schedule(arr) + 0 * arr), expected, rtol=tol)
    ints = be.to_numpy(
        schedule(be.asarray(steps.astype(np.int32))) + 0 * be.asarray(steps.astype(np.float32))
    )
    np.testing.assert_allclose(ints, expected, rtol=1e-6)
    if torch_make is not None:
        np.testing.assert_allclose(
            python, _torch_scheduler_lrs(torch_make, len(steps)), rtol=1e-12, atol=1e-15
        )


def test_schedules_against_optax():
    t = np.arange(60)
    pairs = [
        (optim.cosine_decay(0.3, decay_steps=30, alpha=0.1), optax.cosine_decay_schedule(0.3, 30, alpha=0.1)),
        (
            optim.warmup_cosine_decay(0.3, warmup_steps=5, decay_steps=30, init_value=0.01, end_value=0.02),
            optax.warmup_cosine_decay_schedule(0.01, 0.3, 5, 30, end_value=0.02),
        ),
        (
            optim.warmup_cosine_decay(1.0, warmup_steps=0, decay_steps=10),
            optax.warmup_cosine_decay_schedule(0.0, 1.0, 0, 10),
        ),
    ]
    for ours, theirs in pairs:
        np.testing.assert_allclose(
            [ours(int(s)) for s in t], [float(theirs(int(s))) for s in t], rtol=1e-12, atol=1e-15
        )


def test_cosine_stays_at_floor_after_decay_steps():
    s = optim.cosine_decay(1.0, decay_steps=10, alpha=0.25)
    assert s(10) == pytest.approx(0.25) and s(15) == pytest.approx(0.25) and s(1000) == pytest.approx(0.25)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scheduled_sgd_matches_torch_lr_scheduler(be, dtype):
    """sgd + exponential_decay == torch SGD + ExponentialLR; current_learning_rate tracks it."""
    params0, data, loss = problem("mlp", dtype)
    tx = optim.sgd(optim.exponential_decay(0.5, rate=0.1), momentum=0.9)
    params, bdata = to_backend(be, params0), to_backend(be, data)
    vg, state = gradient_fn(be.name, "mlp", dtype), tx.init(params)

    tparams = tree_map(lambda a: torch.tensor(a).requires_grad_(True), params0)
    opt = T.SGD(tree_leaves(tparams), lr=0.5, momentum=0.9)
    sched = T.lr_scheduler.ExponentialLR(opt, gamma=math.exp(-0.1))
    tdata = tree_map(torch.as_tensor, data)
    for _ in range(10):
        assert float(optim.current_learning_rate(state)) == pytest.approx(
            sched.get_last_lr()[0], rel=TOL[dtype]["rtol"]
        )
        updates, state = tx.update(vg(params, bdata)[1], state, params)
        params = optim.apply_updates(params, updates)
        opt.zero_grad()
        loss(tparams, tdata).backward()
        opt.step()
        sched.step()
    assert_tree_close(to_numpy(be, params), tree_map(lambda t: t.detach().numpy(), tparams), dtype)
    assert float(optim.current_learning_rate(state)) == pytest.approx(0.5 * math.exp(-1.0), rel=1e-6)


# ----------------------------------------------------------------------------- Rosenbrock


def _rosenbrock(params):
    x = params["xy"]
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def _rosenbrock_value_and_grad(params):
    """By hand, with backend math: the test is of the optimizers, and it keeps torch's eager
    loop (thousands of steps) fast."""
    xy = params["xy"]
    xp = dg.backend_of(xy).xp
    x, y = xy[0], xy[1]
    r = y - x * x
    grad = xp.stack([-2 * (1 - x) - 400 * x * r, 200 * r])
    return (1 - x) ** 2 + 100 * r * r, {"xy": grad}


def test_rosenbrock_gradient_by_hand(be):
    params = {"xy": be.asarray(np.array([-0.7, 1.3]))}
    value, grads = _rosenbrock_value_and_grad(params)
    auto_value, auto_grads = be.value_and_grad(_rosenbrock)(params)
    assert float(value) == pytest.approx(float(auto_value), rel=1e-14)
    np.testing.assert_allclose(be.to_numpy(grads["xy"]), be.to_numpy(auto_grads["xy"]), rtol=1e-14)


# name -> (optimizer, steps, loss to reach); start (0, 0), loss 1 there; minimum (1, 1)
ROSENBROCK = {
    "sgd": (lambda: optim.sgd(2e-3), 2000, 1e-2),
    "sgd_momentum": (lambda: optim.sgd(3e-3, momentum=0.9), 300, 1e-3),
    "sgd_nesterov": (lambda: optim.sgd(1e-3, momentum=0.9, nesterov=True), 1000, 1e-3),
    "sgd_weight_decay": (lambda: optim.sgd(3e-3, momentum=0.9, weight_decay=1e-4), 300, 1e-3),
    "adam": (lambda: optim.adam(0.03), 300, 1e-3),
    "adamw_cosine": (
        lambda: optim.adamw(optim.cosine_decay(0.1, decay_steps=300), weight_decay=1e-4),
        300,
        1e-3,
    ),
    "rmsprop": (lambda: optim.rmsprop(2e-3), 2000, 1e-2),
    "rmsprop_centered": (lambda: optim.rmsprop(1e-3, centered=True, momentum=0.9), 300, 1e-3),
    "rmsprop_momentum": (lambda: optim.rmsprop(2e-3, momentum=0.9), 300, 1e-3),
    "adagrad": (lambda: optim.adagrad(0.03), 2000, 1e-2),
    "clipped_sgd": (
        lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(3e-3, momentum=0.9)),
        300,
        1e-3,
    ),
}


@pytest.mark.parametrize("case", sorted(ROSENBROCK))
def test_converges_on_rosenbrock(be, case):
    make, steps, target = ROSENBROCK[case]
    tx = make()
    params = {"xy": be.asarray(np.zeros(2))}
    state = tx.init(params)

    def step(params, state):
        value, grads = _rosenbrock_value_and_grad(params)
        updates, state = tx.update(grads, state, params)
        return optim.apply_updates(params, updates), state, value

    step = be.jit(step)  # jax.jit; eager on torch
    first = None
    for _ in range(steps):
        params, state, value = step(params, state)
        first = float(value) if first is None else first
    final = float(_rosenbrock(params))
    assert first == pytest.approx(1.0)
    assert final < target, f"{case}: loss {final:.3g} after {steps} steps, wanted < {target}"
    np.testing.assert_allclose(be.to_numpy(params["xy"]), [1.0, 1.0], atol=0.25)


# ----------------------------------------------------------------------------- jit

# name -> (optimizer, problem): every optimizer on the quadratic (quick to compile), schedules,
# clipping and the optax adapter on the MLP
JIT_CASES = {
    **{k: (v[0], "quadratic") for k, v in CASES.items()},
    "adam_warmup_cosine": (
        lambda: optim.adam(optim.warmup_cosine_decay(0.01, warmup_steps=2, decay_steps=10)),
        "mlp",
    ),
    "sgd_step_decay": (lambda: optim.sgd(optim.step_decay(0.1, step_size=2)), "quadratic"),
    "sgd_exponential": (lambda: optim.sgd(optim.exponential_decay(0.1, rate=0.1), momentum=0.9), "quadratic"),
    "clipped_adamw": (
        lambda: optim.chain(optim.clip_by_global_norm(0.5), optim.clip(0.1), optim.adamw(0.01)),
        "mlp",
    ),
    "from_optax": (lambda: optim.from_optax(optax.adamw(0.01, weight_decay=0.1)), "mlp"),
}


# float32 under 64-bit mode is where a stray float64 or weak type would change the state's type;
# float64 too for the MLP cases
JIT_PARAMS = [(c, d) for c in sorted(JIT_CASES) for d in DTYPES if d == "float32" or JIT_CASES[c][1] == "mlp"]


@pytest.mark.parametrize("case, dtype", JIT_PARAMS)
def test_jitted_jax_step_compiles_once(case, dtype):
    be = dg.backend("jax")
    make, name = JIT_CASES[case]
    params0, data, loss = problem(name, dtype)
    tx = make()
    traces = []

    def step(params, state, data):
        traces.append(1)  # runs once per trace
        value, grads = be.value_and_grad(loss)(params, data)
        updates, state = tx.update(grads, state, params)
        return optim.apply_updates(params, updates), state, value

    jitted = jax.jit(step)
    params, bdata = to_backend(be, params0), to_backend(be, data)
    state = tx.init(params)
    p, s = params, state
    for _ in range(3):
        p, s, _ = jitted(p, s, bdata)
    assert len(traces) == 1, f"retraced {len(traces) - 1} times"
    assert jitted._cache_size() == 1, "compiled again (a dtype, weak type or placement changed)"
    # and the compiled step computes what the eager one does
    eager, _ = run_duogard(be, make(), name, dtype, steps=3)
    assert_tree_close(to_numpy(be, p), eager, dtype)
    assert int(optim.step_count(s)) == 3


# ----------------------------------------------------------------------------- errors

BAD = [
    (lambda: optim.sgd(-0.1), "sgd", "learning_rate", "-0.1"),
    (lambda: optim.sgd(0.1, momentum=-0.9), "sgd", "momentum", "-0.9"),
    (lambda: optim.sgd(0.1, weight_decay=-1), "sgd", "weight_decay", "-1"),
    (lambda: optim.sgd(0.1, nesterov=True), "sgd", "nesterov", "True"),
    (lambda: optim.adam(float("nan")), "adam", "learning_rate", "nan"),
    (lambda: optim.adam(b1=1.0), "adam", "b1", "1.0"),
    (lambda: optim.adam(b2=-0.1), "adam", "b2", "-0.1"),
    (lambda: optim.adam(eps=0.0), "adam", "eps", "0.0"),
    (lambda: optim.adamw(weight_decay=-0.01), "adamw", "weight_decay", "-0.01"),
    (lambda: optim.adamw(b1=1.5), "adamw", "b1", "1.5"),
    (lambda: optim.rmsprop(alpha=1.5), "rmsprop", "alpha", "1.5"),
    (lambda: optim.rmsprop(eps=-1e-8), "rmsprop", "eps", "-1e-08"),
    (lambda: optim.rmsprop(momentum=-0.5), "rmsprop", "momentum", "-0.5"),
    (lambda: optim.adagrad(-1.0), "adagrad", "learning_rate", "-1.0"),
    (lambda: optim.adagrad(lr_decay=-1), "adagrad", "lr_decay", "-1"),
    (lambda: optim.adagrad(initial_accumulator_value=-0.1), "adagrad", "initial_accumulator_value", "-0.1"),
    (lambda: optim.adagrad(eps=0), "adagrad", "eps", "0"),
    (lambda: optim.clip_by_global_norm(0.0), "clip_by_global_norm", "max_norm", "0.0"),
    (lambda: optim.clip(-1.0), "clip", "max_delta", "-1.0"),
    (lambda: optim.step_decay(0.1, step_size=0), "step_decay", "step_size", "0"),
    (lambda: optim.cosine_decay(0.1, decay_steps=-5), "cosine_decay", "decay_steps", "-5"),
    (lambda: optim.cosine_decay(0.1, decay_steps=5, alpha=2.0), "cosine_decay", "alpha", "2.0"),
    (
        lambda: optim.warmup_cosine_decay(0.1, warmup_steps=10, decay_steps=10),
        "warmup_cosine_decay",
        "decay_steps",
        "10",
    ),
    (lambda: optim.exponential_decay(0.1, rate=-1.0), "exponential_decay", "rate", "-1.0"),
]


@pytest.mark.parametrize("make, fn, arg, value", BAD, ids=[f"{b[1]}-{b[2]}-{b[3]}" for b in BAD])
def test_bad_hyperparameters_name_argument_and_value(make, fn, arg, value):
    with pytest.raises(ValueError, match=rf"^{fn}: {arg} must be .*got {re.escape(value)}$"):
        make()


def test_bad_types_raise_type_error(be):
    with pytest.raises(TypeError, match="sgd: learning_rate must be a number >= 0 or a schedule.*'fast'"):
        optim.sgd("fast")
    with pytest.raises(TypeError, match="adam: b1 must be a real number, got True"):
        optim.adam(b1=True)
    with pytest.raises(TypeError, match="chain: argument 1 must be a GradientTransformation.*int"):
        optim.chain(optim.sgd(0.1), 3)
    with pytest.raises(TypeError, match="expected jax arrays or torch tensors, got ndarray"):
        optim.adam().init({"w": np.ones(3)})
    with pytest.raises(ValueError, match="at least one array leaf"):
        optim.adam().init({})


def test_current_learning_rate_and_step_count_errors(be):
    state = optim.clip(1.0).init({"w": be.asarray(np.ones(2))})
    with pytest.raises(ValueError, match="holds no learning rate"):
        optim.current_learning_rate(state)
    with pytest.raises(ValueError, match="holds no step count"):
        optim.step_count(state)


# ----------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_norm", [0.5, 100.0])  # clipping, and not
def test_clip_by_global_norm_against_numpy_and_torch(be, dtype, max_norm):
    rng = np.random.default_rng(3)
    grads = {"a": rng.normal(size=(4, 3)).astype(dtype), "b": {"c": rng.normal(size=(5,)).astype(dtype)}}
    got, _ = optim.clip_by_global_norm(max_norm).update(to_backend(be, grads), optim.EmptyState())
    got = to_numpy(be, got)
    norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in tree_leaves(grads)))
    coef = min(1.0, max_norm / (norm + 1e-6))
    assert_tree_close(got, tree_map(lambda g: g * coef, grads), dtype)
    tgrads = tree_map(lambda g: torch.zeros(g.shape, dtype=getattr(torch, dtype), requires_grad=True), grads)
    for t, g in zip(tree_leaves(tgrads), tree_leaves(grads)):
        t.grad = torch.tensor(g)
    total = torch.nn.utils.clip_grad_norm_(tree_leaves(tgrads), max_norm)
    assert float(total) == pytest.approx(norm, rel=1e-6)
    assert_tree_close(got, tree_map(lambda t: t.grad.numpy(), tgrads), dtype)
    if max_norm < norm:
        clipped = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in tree_leaves(got)))
        assert clipped == pytest.approx(max_norm, rel=1e-5)
    # eps=0 is optax's rule
    ours, _ = optim.clip_by_global_norm(max_norm, eps=0.0).update(to_backend(be, grads), optim.EmptyState())
    theirs, _ = optax.clip_by_global_norm(max_norm).update(tree_map(jnp.asarray, grads), optax.EmptyState())
    assert_tree_close(to_numpy(be, ours), theirs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_by_value_against_numpy_and_torch(be, dtype):
    g = np.random.default_rng(4).normal(size=(6, 5)).astype(dtype) * 2
    got, _ = optim.clip(0.7).update({"g": be.asarray(g)}, optim.EmptyState())
    got = be.to_numpy(got["g"])
    np.testing.assert_array_equal(got, np.clip(g, -0.7, 0.7))
    t = torch.zeros(g.shape, dtype=getattr(torch, dtype), requires_grad=True)
    t.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_value_([t], 0.7)
    np.testing.assert_array_equal(got, t.grad.numpy())
    assert (np.abs(g) > 0.7).any()


# ----------------------------------------------------------------------------- adapters


def test_from_optax_drives_jax_and_reads_its_learning_rate():
    be = dg.backend("jax")
    tx = optim.from_optax(optax.inject_hyperparams(optax.adam)(learning_rate=0.01))
    got, state = run_duogard(be, tx, "mlp", "float64")
    ours, _ = run_duogard(be, optim.adam(0.01), "mlp", "float64")
    assert_tree_close(got, ours, "float64")
    assert float(optim.current_learning_rate(state)) == pytest.approx(0.01)
    assert int(optim.step_count(state)) == STEPS


def test_from_optax_rejects_torch_leaves():
    th = dg.backend("torch")
    tx = optim.from_optax(optax.sgd(0.1))
    params = {"layer": {"w": th.asarray(np.ones(3))}}
    with pytest.raises(
        TypeError,
        match=r"from_optax: expected jax\.Array leaves in params, got a torch array at "
        r"'layer\.w'; .*backend='jax'.*from_torch_optimizer",
    ):
        tx.init(params)
    state = tx.init({"layer": {"w": jnp.ones(3)}})
    with pytest.raises(TypeError, match="from_optax: expected jax.Array leaves in grads"):
        tx.update(params, state)
    with pytest.raises(TypeError, match="from_optax: expected an optax GradientTransformation, got int"):
        optim.from_optax(3)


def _torch_direct(params0, data, loss, make_opt, make_sched=None, steps=STEPS):
    params = tree_map(lambda a: torch.tensor(a).requires_grad_(True), params0)
    opt = make_opt(tree_leaves(params))
    sched = make_sched(opt) if make_sched else None
    data = tree_map(torch.as_tensor, data)
    lrs = []
    for _ in range(steps):
        opt.zero_grad()
        loss(params, data).backward()
        opt.step()
        if sched:
            sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return tree_map(lambda t: t.detach().numpy(), params), lrs


@pytest.mark.parametrize("dtype", DTYPES)
def test_from_torch_matches_torch_optim(dtype):
    be = dg.backend("torch")
    params0, data, loss = problem("mlp", dtype)
    tx = optim.from_torch_optimizer(T.AdamW, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)
    got, state = run_duogard(be, tx, "mlp", dtype)
    want, _ = _torch_direct(
        params0, data, loss, lambda p: T.AdamW(p, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)
    )
    assert_tree_close(got, want, dtype, rtol=TOL[dtype]["rtol"] / 10)
    assert int(optim.step_count(state)) == STEPS
    assert float(optim.current_learning_rate(state)) == 0.01
    assert set(state.buffers["0"]["weight"]) == {"step", "exp_avg", "exp_avg_sq"}
    # and it agrees with duogard's own adamw (torch semantics)
    ours, _ = run_duogard(be, optim.adamw(0.01, b1=0.8, b2=0.99, weight_decay=0.1), "mlp", dtype)
    assert_tree_close(got, ours, dtype)


def test_from_torch_with_scheduler_and_restored_state():
    be = dg.backend("torch")
    params0, data, loss = problem("mlp", "float64")

    def make_sched(o):
        return T.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)

    tx = optim.from_torch_optimizer(T.SGD, lr=0.2, momentum=0.9, scheduler=make_sched)
    params, bdata = to_backend(be, params0), to_backend(be, data)
    vg, state = gradient_fn(be.name, "mlp", "float64"), tx.init(params)
    want, want_lrs = _torch_direct(params0, data, loss, lambda p: T.SGD(p, lr=0.2, momentum=0.9), make_sched)
    lrs, snapshot = [], None
    for i in range(STEPS):
        if i == 10:
            snapshot = (params, tree_map(torch.clone, state))
        updates, state = tx.update(vg(params, bdata)[1], state, params)
        params = optim.apply_updates(params, updates)
        lrs.append(float(optim.current_learning_rate(state)))
    assert_tree_close(to_numpy(be, params), want, "float64")
    np.testing.assert_allclose(lrs, want_lrs, rtol=1e-15)
    # replay from the step-10 snapshot: the optimizer reloads it (momentum, lr, scheduler)
    params, state = snapshot
    for _ in range(10, STEPS):
        updates, state = tx.update(vg(params, bdata)[1], state, params)
        params = optim.apply_updates(params, updates)
    assert_tree_close(to_numpy(be, params), want, "float64")
    assert float(optim.current_learning_rate(state)) == pytest.approx(want_lrs[-1])


def test_from_torch_update_without_params():
    """Without params, update steps from its own copy (the caller applied the last updates)."""
    be = dg.backend("torch")
    params0, data, loss = problem("quadratic", "float64")
    tx = optim.from_torch_optimizer(T.SGD, lr=0.1, momentum=0.9)
    params, bdata = to_backend(be, params0), to_backend(be, data)
    vg, state = gradient_fn("torch", "quadratic", "float64"), tx.init(params)
    for _ in range(5):
        updates, state = tx.update(vg(params, bdata)[1], state)
        params = optim.apply_updates(params, updates)
    want, _ = _torch_direct(params0, data, loss, lambda p: T.SGD(p, lr=0.1, momentum=0.9), steps=5)
    assert_tree_close(to_numpy(be, params), want, "float64")


def test_from_torch_errors():
    jx = dg.backend("jax")
    tx = optim.from_torch_optimizer(T.Adam, lr=1e-3)
    with pytest.raises(RuntimeError, match="call init"):
        tx.update({"w": torch.ones(2)}, None)
    with pytest.raises(
        TypeError,
        match=r"from_torch_optimizer: expected torch.Tensor leaves in params, got a jax array at 'w'; "
        r".*backend='torch'.*from_optax",
    ):
        tx.init({"w": jx.asarray(np.ones(2))})
    state = tx.init({"w": torch.ones(2)})
    with pytest.raises(TypeError, match="from_torch_optimizer: expected torch.Tensor leaves in grads"):
        tx.update({"w": jx.asarray(np.ones(2))}, state)
    with pytest.raises(
        ValueError, match=r"from_torch_optimizer: Adam\(lr=-1\.0\) failed: Invalid learning rate"
    ):
        optim.from_torch_optimizer(T.Adam, lr=-1.0)
    with pytest.raises(TypeError, match="from_torch_optimizer: expected a torch.optim optimizer class"):
        optim.from_torch_optimizer("adam")


# ----------------------------------------------------------------------------- misc


def test_apply_updates_keeps_dtype_and_chain_composes(be):
    p = {"w": be.asarray(np.ones(3, np.float32))}
    u = {"w": be.asarray(np.full(3, 0.5, np.float64))}
    out = optim.apply_updates(p, u)
    assert be.dtype_name(out["w"].dtype) == "float32"
    np.testing.assert_array_equal(be.to_numpy(out["w"]), [1.5, 1.5, 1.5])
    # chain(scale(2), scale_by_learning_rate(0.1)) is sgd with lr 0.2
    tx = optim.chain(optim.scale(2.0), optim.identity(), optim.scale_by_learning_rate(0.1))
    ups, state = tx.update(p, tx.init(p), p)
    np.testing.assert_allclose(be.to_numpy(ups["w"]), [-0.2] * 3, rtol=1e-6)
    assert len(state) == 3 and int(optim.step_count(state)) == 1


def test_from_torch_is_a_deprecated_alias_of_from_torch_optimizer():
    """``dg.optim.from_torch`` (the optimizer adapter) was renamed: ``dg.from_torch`` ports a
    module. The old name still works for one release, with a DeprecationWarning naming the new one."""
    pytest.importorskip("torch")
    with pytest.warns(
        DeprecationWarning, match=r"duogard\.optim\.from_torch is deprecated.*from_torch_optimizer"
    ):
        old = optim.from_torch
    assert old is optim.from_torch_optimizer
    assert "from_torch" not in optim.__all__  # `from duogard.optim import *` does not warn


def test_module_exports():
    assert set(optim.__all__) <= set(dir(optim))
    for name in (
        "sgd",
        "adam",
        "adamw",
        "rmsprop",
        "adagrad",
        "chain",
        "apply_updates",
        "from_optax",
        "from_torch_optimizer",
        "exponential_decay",
        "current_learning_rate",
    ):
        assert name in optim.__all__
