"""fwdgrad's MNIST experiment, as its authors ran it, on duogard with JAX or PyTorch.

fwdgrad (github.com/orobix/fwdgrad) trains its ``NeuralNet`` (the MLP 784-1024-1024-10, or
logistic regression with no hidden layer) or its 64-channel ``ConvNet`` with forward gradients
(or backprop), ``torch.optim.SGD(lr=2e-4)`` without momentum, a ``LambdaLR`` decay
``exp(-1e-4 * step)``, no clipping, batches of 64, for 200 epochs, and writes ``Loss/train_loss``
and ``Misc/lr`` every step, ``Time/batch_time`` and ``Time/sps`` every epoch and
``Test/accuracy`` at the end to TensorBoard. Its settings are Hydra config groups
(``configs/``: ``dataset``, ``model``, ``optimization``); so are these, with the same numbers.

- ``backend=torch``: the ``nn.Module`` itself, ``torch.optim`` and ``LambdaLR`` as fwdgrad
  builds them; ``loss.backward()`` (or fwdgrad's hand-written ``torch.func.jvp`` step) is
  replaced by ``duogard.torch.forward_grad_``.
- ``backend=jax``: the same module (same initial weights) lowered with ``duogard.from_torch``,
  trained with the duogard estimator and ``duogard.optim.sgd(exponential_decay(2e-4,
  rate=1e-4))`` under one ``jax.jit``; the weights are then loaded back into the module with
  ``duogard.to_torch``. The batches and the tangents (duogard's Philox keys, step ``i`` using
  ``fold_in(key(seed), i)``) are the same on both backends.

Run (``--help`` for Hydra's help; ``-m`` sweeps, e.g. ``-m grad=forward,backprop``)::

    python examples/fwdgrad/mnist.py backend=torch grad=forward          # MLP, digits at 28x28
    python examples/fwdgrad/mnist.py model=conv dataset.path=~/data/mnist # MNIST IDX files
    python examples/fwdgrad/mnist.py model=logreg grad=backprop optimization.epochs=1
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the configs' _target_ names fwdgrad_models
    sys.path.insert(0, str(HERE))

import hydra  # noqa: E402
import numpy as np  # noqa: E402
from fwdgrad_common import (  # noqa: E402
    ConfigError,
    ScalarLog,
    backend_of_config,
    check_finite,
    load_images,
    method_of,
    run_cli,
    run_dir,
)
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import duogard as dg  # noqa: E402

__all__ = ["train", "main", "TorchRunner", "PortedRunner"]


def _number(cfg, dotted: str, *, minimum: float, strict: bool, integer: bool = False):
    value = OmegaConf.select(cfg, dotted)
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        kind = "an int" if integer else "a number"
        raise ConfigError(f"{dotted}: expected {kind} {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return value


def loss_fn(logits, labels):
    """Mean softmax cross-entropy (fwdgrad's hand-written ``xent``, in its stable form)."""
    return dg.losses.cross_entropy(logits, labels)


class TorchRunner:
    """fwdgrad's training loop on PyTorch, with ``loss.backward()`` replaced by duogard.

    Args:
        module: the ``nn.Module`` (trained in place).
        method: a parsed ``grad`` (``duogard.methods.MethodSpec``).
        opt: the ``optimization`` config.
        seed: the seed of the tangents' key sequence.
    """

    def __init__(self, module, method, opt, seed: int):
        import torch

        self.torch = torch
        self.module = module
        self.method = method
        if opt.optimizer == "adam":
            self.optimizer = torch.optim.Adam(
                module.parameters(), lr=opt.learning_rate, eps=opt.eps, weight_decay=opt.weight_decay
            )
        else:
            self.optimizer = torch.optim.SGD(
                module.parameters(),
                lr=opt.learning_rate,
                momentum=opt.momentum,
                nesterov=opt.nesterov,
                weight_decay=opt.weight_decay,
            )
        k = float(opt.k)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: math.exp(-k * step))
        self.clip = float(opt.grad_clipping)
        self.keys = dg.torch.KeySequence(seed)

    def _loss(self, module, batch):
        return loss_fn(module(batch[0]), batch[1])

    def step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """One update on batch ``(x, y)``; returns ``(loss, learning rate used)``."""
        torch = self.torch
        lr = self.scheduler.get_last_lr()[0]
        batch = (torch.from_numpy(x), torch.from_numpy(y))
        loss = dg.torch.forward_grad_(
            self.module, self._loss, batch, method=self.method.estimator, key=self.keys
        )
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss), float(lr)

    def finish(self):
        """The trained module (already in place)."""
        return self.module


class PortedRunner:
    """The same training on another backend (JAX): the module lowered with ``dg.from_torch``.

    Args:
        be: the duogard backend module.
        module: the ``nn.Module`` (its initial weights are used; trained ones loaded back by
            :meth:`finish`).
        example: an input batch (NumPy), to check the module with.
        method, opt, seed: as for :class:`TorchRunner`.
    """

    def __init__(self, be, module, example, method, opt, seed: int):
        self.be, self.module = be, module
        self.model = dg.from_torch(module, example)
        self.schedule = dg.optim.exponential_decay(opt.learning_rate, rate=opt.k)
        if opt.optimizer == "adam":
            base = dg.optim.adam(self.schedule, eps=opt.eps, weight_decay=opt.weight_decay)
        else:
            base = dg.optim.sgd(
                self.schedule, momentum=opt.momentum, nesterov=opt.nesterov, weight_decay=opt.weight_decay
            )
        clip = float(opt.grad_clipping)
        tx = dg.optim.chain(dg.optim.clip_by_global_norm(clip), base) if clip > 0 else base
        est, model = method.estimator, self.model

        def objective(params, batch):
            return loss_fn(model.apply(params, batch[0]), batch[1])

        @be.jit
        def step(params, state, batch, base, i):  # fold_in inside: eager it costs ~20 ms on JAX
            loss, grads = est(objective, params, batch, be.fold_in(base, i))
            updates, state = tx.update(grads, state, params)
            return dg.optim.apply_updates(params, updates), state, loss

        self._step = step
        self.params = {k: be.asarray(v) for k, v in model.trainable().items()}
        self.state = tx.init(self.params)
        self.base_key = be.key(seed)
        self.count = 0

    def step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """One update on batch ``(x, y)``; returns ``(loss, learning rate used)``."""
        be = self.be
        lr = float(self.schedule(self.count))
        self.params, self.state, loss = self._step(
            self.params, self.state, (be.asarray(x), be.asarray(y)), self.base_key, self.count
        )
        self.count += 1
        return float(loss), lr

    def finish(self):
        """The module with the trained weights loaded back (``dg.to_torch``)."""
        return dg.to_torch({**self.model.params, **self.params}, self.module)


def epoch_order(data, epoch: int, *, shuffle: bool, seed: int) -> np.ndarray:
    """The training examples' order in ``epoch``: a seeded permutation, or stored order."""
    return data.epoch_order(epoch, seed=seed) if shuffle else np.arange(data.num_train)


def accuracy_of(module, data, batch_size: int = 500) -> float:
    """The module's accuracy on the test set (argmax of the logits), computed with torch."""
    import torch

    hits = 0
    with torch.no_grad():
        for x, y in data.eval_batches(batch_size):
            hits += int((module(torch.from_numpy(x)).argmax(dim=-1).numpy() == y).sum())
    return hits / data.num_test


def _check(cfg):
    for dotted, minimum, strict, integer in (
        ("optimization.learning_rate", 0, True, False),
        ("optimization.k", 0, False, False),
        ("optimization.epochs", 1, False, True),
        ("optimization.weight_decay", 0, False, False),
        ("optimization.grad_clipping", 0, False, False),
        ("dataset.batch_size", 1, False, True),
    ):
        _number(cfg, dotted, minimum=minimum, strict=strict, integer=integer)
    if cfg.optimization.optimizer not in ("sgd", "adam"):
        raise ConfigError(
            f"optimization.optimizer: expected 'sgd' or 'adam', got {cfg.optimization.optimizer!r}"
        )
    if cfg.optimization.optimizer == "sgd":
        _number(cfg, "optimization.momentum", minimum=0, strict=False)
    else:
        _number(cfg, "optimization.eps", minimum=0, strict=True)
    if cfg.steps is not None:
        _number(cfg, "steps", minimum=1, strict=False, integer=True)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"seed: expected an int >= 0, got {cfg.seed!r}")
    if not OmegaConf.select(cfg, "model._target_"):
        raise ConfigError(
            "model: expected a model config with a _target_ (model=default, model=conv, model=logreg)"
        )


def train(cfg: DictConfig) -> dict:
    """Run the experiment of ``cfg`` (the composed ``configs/config.yaml``); return its results.

    Returns:
        A dict: ``backend``, ``grad``, ``model``, ``data``, ``steps``, ``losses`` (every
        step's), ``final_loss``, ``test_accuracy``, ``ms_per_step`` (median, first step
        excluded), ``logdir`` (the run's folder) and ``parameters``.

    Raises:
        ConfigError: a bad setting (named).
        FloatingPointError: the loss became non-finite (the step and what to lower are named).
    """
    import torch

    _check(cfg)
    be = backend_of_config(cfg.backend)
    method = method_of(cfg.grad)
    if cfg.threads is not None:
        torch.set_num_threads(_number(cfg, "threads", minimum=1, strict=False, integer=True))
    target = cfg.model._target_
    try:
        flat = bool(getattr(hydra.utils.get_class(target), "flat_input", False))
    except Exception as exc:  # hydra raises ImportError or ValueError, with the cause
        raise ConfigError(f"model._target_: expected an importable class, got {target!r} ({exc})") from None
    data, what = load_images(cfg.dataset, flat=flat, seed=cfg.seed)
    torch.manual_seed(cfg.seed)  # fwdgrad's initialisation: torch's default, seeded
    input_size = data.input_shape[0]  # features for NeuralNet, channels for ConvNet
    module = hydra.utils.instantiate(cfg.model, input_size=input_size, output_size=data.num_classes)
    module.float().train()
    n_params = sum(p.numel() for p in module.parameters())
    name = type(module).__name__
    if be.name == "torch":
        runner = TorchRunner(module, method, cfg.optimization, cfg.seed)
    else:
        runner = PortedRunner(be, module, data.x_train[:2], method, cfg.optimization, cfg.seed)
    opt, ds = cfg.optimization, cfg.dataset
    print(
        f"{name} ({n_params:,} parameters) on {what}; backend {be.name}, grad {method.label}, "
        f"{opt.optimizer} lr {opt.learning_rate:g} * exp(-{opt.k:g} step), batch {ds.batch_size}"
    )
    per_epoch = data.num_train // ds.batch_size if ds.drop_last else -(-data.num_train // ds.batch_size)
    if per_epoch == 0:
        raise ConfigError(
            f"dataset.batch_size: {ds.batch_size} exceeds the {data.num_train} training examples "
            "with drop_last=true"
        )
    total = opt.epochs * per_epoch if cfg.steps is None else min(cfg.steps, opt.epochs * per_epoch)
    folder = run_dir(cfg.logdir, f"{cfg.grad}_{be.name}")
    losses, times, step, t_total = [], [], 0, 0.0
    with ScalarLog(folder) as log:
        for epoch in range(opt.epochs):
            if step >= total:
                break
            order = epoch_order(data, epoch, shuffle=ds.shuffle, seed=cfg.seed)
            t0 = time.perf_counter()
            for start in range(0, per_epoch * ds.batch_size, ds.batch_size):
                idx = order[start : start + ds.batch_size]
                s0 = time.perf_counter()
                loss, lr = runner.step(data.x_train[idx], data.y_train[idx])
                times.append(time.perf_counter() - s0)
                step += 1
                check_finite(
                    f"{name} ({be.name}, grad {method.label})", loss, step, "lower optimization.learning_rate"
                )
                losses.append(loss)
                log.add("Loss/train_loss", loss, step)
                log.add("Misc/lr", lr, step)
                if step >= total:
                    break
            t1 = time.perf_counter()
            t_total += t1 - t0
            log.add("Time/batch_time", t1 - t0, step)
            log.add("Time/sps", step / t_total, step)
            print(f"Epoch [{epoch + 1}/{opt.epochs}], Loss: {loss:.4f}, Time (s): {t1 - t0:.4f}")
        trained = runner.finish()
        accuracy = accuracy_of(trained, data)
        log.add("Test/accuracy", accuracy, step)
    ms = 1e3 * float(np.median(times[1:] if len(times) > 1 else times))
    print(f"Test accuracy: {accuracy:.4f}")
    print(
        f"{name} {be.name} {method.label}: {step} steps, final loss {losses[-1]:.4f}, "
        f"test accuracy {accuracy:.4f}, {ms:.2f} ms/step; scalars in {folder}"
    )
    result = {
        "backend": be.name,
        "grad": method.label,
        "model": name,
        "parameters": n_params,
        "data": what,
        "steps": step,
        "losses": losses,
        "final_loss": losses[-1],
        "test_accuracy": accuracy,
        "ms_per_step": ms,
        "logdir": str(folder),
    }
    summary = {k: v for k, v in result.items() if k != "losses"}  # every loss is in scalars.csv
    (folder / "result.json").write_text(json.dumps(summary, indent=1))
    return result


@hydra.main(version_base="1.3", config_path=str(HERE / "configs"), config_name="config")
def main(cfg: DictConfig) -> None:
    """The Hydra entry point: a bad setting exits with 2, a diverged run with 1 (one line each)."""
    run_cli(train, cfg, "mnist.py")


if __name__ == "__main__":
    main()
