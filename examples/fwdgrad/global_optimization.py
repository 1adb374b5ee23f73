"""fwdgrad's global optimisation of Beale's (and Rosenbrock's) function, on duogard.

fwdgrad's ``global_optimization_fwdgrad.py`` / ``..._backprop.py``: ``torch.manual_seed(42)``,
start at ``torch.rand(2)``, then 1000 steps of plain SGD with learning rate 1e-2 (no momentum,
no schedule, no clipping), the gradient being the forward gradient ``(∇f·v) v`` with
``v ~ N(0, I)`` (or backprop's). Its settings are ``configs/global_optim.yaml`` (the function is
a config group: ``function=beale``, ``function=rosenbrock``); these are the same numbers.

Every iteration's ``f`` goes to TensorBoard as ``Loss/train_loss`` (with the point as
``Params/x`` and ``Params/y``), and to CSV and JSONL. The tangents are duogard's (step ``i``
uses ``fold_in(key(seed), i)``), the same on JAX and on PyTorch.

Run::

    python examples/fwdgrad/global_optimization.py                     # Beale, forward, jax
    python examples/fwdgrad/global_optimization.py backend=torch grad=backprop
    python examples/fwdgrad/global_optimization.py function=rosenbrock learning_rate=1e-3 iterations=20000
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import hydra  # noqa: E402
import numpy as np  # noqa: E402
from fwdgrad_common import (  # noqa: E402
    ConfigError,
    ScalarLog,
    backend_of_config,
    check_finite,
    method_of,
    run_cli,
    run_dir,
)
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import duogard as dg  # noqa: E402

__all__ = ["minimise", "main"]


def _objective_name(cfg) -> str:
    target = OmegaConf.select(cfg, "function._target_")
    if not isinstance(target, str):
        raise ConfigError(
            "function: expected a config with a _target_ (function=beale or function=rosenbrock), "
            f"got {OmegaConf.to_container(cfg.function) if 'function' in cfg else None!r}"
        )
    return target.rsplit(".", 1)[-1]


def _check(cfg) -> None:
    lr = cfg.learning_rate
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"learning_rate: expected a number > 0, got {lr!r}")
    n = cfg.iterations
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"iterations: expected an int >= 1, got {n!r}")
    start = OmegaConf.to_container(cfg.start) if OmegaConf.is_list(cfg.start) else cfg.start
    if not isinstance(start, list) or len(start) != 2 or not all(isinstance(v, (int, float)) for v in start):
        raise ConfigError(f"start: expected two numbers [x, y], got {start!r}")
    if cfg.dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype: expected 'float32' or 'float64', got {cfg.dtype!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"seed: expected an int >= 0, got {cfg.seed!r}")
    every = cfg.print_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"print_every: expected an int >= 0 (0: never), got {every!r}")


def minimise(cfg: DictConfig, *, quiet: bool = False) -> dict:
    """Run the global optimisation of ``cfg`` (the composed ``configs/global_optim.yaml``).

    Returns:
        A dict: ``function``, ``backend``, ``grad``, ``point`` (the final (x, y)), ``value``
        (f there), ``distance`` to the known minimum, ``losses`` (f at every iteration, before
        its update, as fwdgrad prints it), ``seconds`` and ``logdir``.

    Raises:
        ConfigError: a bad setting (named).
        FloatingPointError: f became non-finite (the iteration and what to lower are named).
    """
    _check(cfg)
    be = backend_of_config(cfg.backend)
    method = method_of(cfg.grad)
    name = _objective_name(cfg)
    try:
        fn = hydra.utils.call(cfg.function)  # a partial, as fwdgrad's `_partial_: true`
    except Exception as exc:  # hydra raises InstantiationException, with the cause
        raise ConfigError(f"function: cannot make {cfg.function._target_!r} ({exc})") from None
    est = method.estimator
    tx = dg.optim.sgd(cfg.learning_rate)  # plain SGD: p <- p - lr * g

    def loss(params, batch):  # no data: the objective of the point
        return fn(params["xy"])

    @be.jit
    def step(params, state, base, i):  # the key is folded inside: eager fold_in costs ~20 ms on JAX
        value, grads = est(loss, params, None, be.fold_in(base, i))
        updates, state = tx.update(grads, state, params)
        return dg.optim.apply_updates(params, updates), state, value

    params = {"xy": be.asarray(np.asarray(list(cfg.start), dtype=cfg.dtype))}
    state, base = tx.init(params), be.key(cfg.seed)
    folder = run_dir(cfg.logdir, f"{name}_{cfg.grad}_{be.name}")
    losses, t_total = [], 0.0
    with ScalarLog(folder) as log:
        for i in range(cfg.iterations):
            t0 = time.perf_counter()
            params, state, value = step(params, state, base, i)
            value = float(value)
            t1 = time.perf_counter()
            t_total += t1 - t0
            check_finite(
                f"{name} ({be.name}, grad {method.label}, learning_rate {cfg.learning_rate:g})",
                value,
                i + 1,
                "lower learning_rate",
            )
            losses.append(value)
            x, y = (float(v) for v in be.to_numpy(params["xy"]))
            log.add("Loss/train_loss", value, i + 1)
            log.add("Params/x", x, i + 1)
            log.add("Params/y", y, i + 1)
            if not quiet and cfg.print_every and i % cfg.print_every == 0:
                print(f"Iteration [{i + 1}/{cfg.iterations}], Loss: {value:.4f}, Time (s): {t1 - t0:.4f}")
        log.add("Time/total", t_total, cfg.iterations)
    point = be.to_numpy(params["xy"]).astype(np.float64)
    known = dg.data.OBJECTIVES.get(name)
    distance = float(np.linalg.norm(point - np.asarray(known.minimum))) if known else float("nan")
    result = {
        "function": name,
        "backend": be.name,
        "grad": method.label,
        "learning_rate": float(cfg.learning_rate),
        "iterations": int(cfg.iterations),
        "start": [float(v) for v in cfg.start],
        "point": point.tolist(),
        "value": float(fn(point)),
        "distance": distance,
        "losses": losses,
        "seconds": t_total,
        "logdir": str(folder),
    }
    summary = {k: v for k, v in result.items() if k != "losses"}  # every f is in scalars.csv
    (folder / "result.json").write_text(json.dumps(summary, indent=1))
    if not quiet:
        print(f"Total time: {t_total:.4f}")
        print(f"Parameters value:\n\tx: {point[0]}\n\ty: {point[1]}")
        where = f", distance to the minimum {tuple(known.minimum)} {distance:.2e}" if known else ""
        print(
            f"{name} {be.name} {method.label}: {cfg.iterations} iterations (lr {cfg.learning_rate:g}) -> "
            f"({point[0]:.4f}, {point[1]:.4f}), f = {result['value']:.2e}{where}; scalars in {folder}"
        )
    return result


@hydra.main(version_base="1.3", config_path=str(HERE / "configs"), config_name="global_optim")
def main(cfg: DictConfig) -> None:
    """The Hydra entry point: a bad setting exits with 2, a diverged run with 1 (one line each)."""
    run_cli(minimise, cfg, "global_optimization.py")


if __name__ == "__main__":
    main()
