"""Port fwdgrad's PyTorch forward-gradient script to duogard, side by side.

fwdgrad (github.com/orobix/fwdgrad) trains its ``NeuralNet`` (MLP 784-1024-1024-10, or
logistic regression with no hidden layer) or its 64-channel ``ConvNet`` on MNIST with
``torch.optim.SGD(lr=2e-4)`` (no momentum), ``LambdaLR(exp(-1e-4 * step))``, no gradient
clipping, batches of 64, and a loop that calls ``torch.func.jvp`` over ``functional_call`` and
sets ``p.grad = v * jvp``. This script runs that loop three ways, from the same initial
weights, on the same batches:

- ``hand_written``: fwdgrad's loop, as its authors wrote it.
- ``ported_torch`` (``--backend torch``): the same loop with the tangent/JVP lines replaced by
  one call, ``duogard.torch.forward_grad_``; ``--grad`` switches the estimator.
- ``ported_jax`` (``--backend jax``): the same module on JAX: ``duogard.from_torch`` lowers its
  forward onto duogard's ops, a duogard estimator and ``duogard.optim.sgd`` with
  ``exponential_decay`` train it under one ``jax.jit``, and ``duogard.to_torch`` loads the
  result back into the module.

The models are fwdgrad's, from ``examples/fwdgrad/fwdgrad_models.py`` (``--model mlp``,
``logreg``, ``cnn``), on the built-in digits upsampled to 28x28 (or MNIST's IDX files with
``--data-dir``). At fwdgrad's learning rate a few hundred steps move the loss only a little:
that is the setting, not a bug (``--lr`` changes it). The whole experiment, with its Hydra
configs, 200 epochs and TensorBoard logs, is ``examples/fwdgrad/mnist.py``.

``MLP`` and ``ConvNet`` below are digit-sized (8x8) fwdgrad-style modules (``--model
small-mlp``, ``small-cnn``), also used by ``tests/test_torch_port.py``.

Run: ``python examples/port_fwdgrad.py --backend jax --grad forward --model logreg``
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import duogard as dg

FWDGRAD = Path(__file__).resolve().parent / "fwdgrad"
if str(FWDGRAD) not in sys.path:
    sys.path.insert(0, str(FWDGRAD))

from fwdgrad_common import load_images  # noqa: E402
from fwdgrad_models import ConvNet as FwdgradConvNet  # noqa: E402
from fwdgrad_models import NeuralNet  # noqa: E402

#: fwdgrad's optimisation settings (its configs/optimizer, configs/scheduler, config.yaml)
FWDGRAD_SETTINGS = dict(lr=2e-4, momentum=0.0, decay=1e-4, clip=0.0, batch_size=64)

# ----------------------------------------------------------------------------- small modules


class MLP(nn.Module):
    """A digit-sized fwdgrad-style MLP (built with ``setattr`` in a loop) on 8x8 images."""

    def __init__(self, sizes=(64, 128, 64, 10)):
        super().__init__()
        self.num_layers = len(sizes) - 1
        for i in range(self.num_layers):
            setattr(self, f"fc{i}", nn.Linear(sizes[i], sizes[i + 1]))

    def forward(self, x):
        x = x.view(x.shape[0], -1)
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


class ConvNet(nn.Module):
    """A digit-sized LeNet-like ConvNet with a functional forward, on 8x8 images."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(x.shape[0], -1)
        return self.fc2(F.relu(self.fc1(x)))


MODELS = ("mlp", "logreg", "cnn", "small-mlp", "small-cnn")


def make_module(name: str, seed: int) -> nn.Module:
    """Model ``name`` (one of :data:`MODELS`) with torch's default initialisation under ``seed``."""
    torch.manual_seed(seed)
    if name == "mlp":
        return NeuralNet(784, [1024, 1024], 10)
    if name == "logreg":
        return NeuralNet(784, [], 10)
    if name == "cnn":
        return FwdgradConvNet(1, 10)
    if name == "small-mlp":
        return MLP()
    if name == "small-cnn":
        return ConvNet()
    raise ValueError(f"make_module: name must be one of {list(MODELS)}, got {name!r}")


def load_data(name: str, data_dir, seed: int):
    """fwdgrad's input pipeline for model ``name``: (data, description)."""
    if name.startswith("small-"):
        return dg.data.load("digits", seed=seed), "built-in digits, 8x8"
    dataset = {"path": data_dir, "mean": 0.1307, "std": 0.3081}
    return load_images(dataset, flat=name != "cnn", seed=seed)


def loss_fn(module, batch):
    """Mean softmax cross-entropy of the module's logits (fwdgrad's ``xent``)."""
    x, y = batch
    return F.cross_entropy(module(x), y)


def torch_optimizer(module, args):
    """fwdgrad's ``torch.optim.SGD`` and ``LambdaLR(exp(-k * step))``."""
    opt = torch.optim.SGD(module.parameters(), lr=args.lr, momentum=args.momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: math.exp(-args.decay * step))
    return opt, sched


# ----------------------------------------------------------------------------- before: by hand


def hand_written(module, data, args):
    """fwdgrad's loop: a normal tangent per parameter, ``torch.func.jvp``, ``p.grad = v * jvp``."""
    opt, sched = torch_optimizer(module, args)
    torch.manual_seed(args.seed)
    for x, y in data.batches(args.batch_size, seed=args.seed, steps=args.steps):
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        params = {name: p.detach() for name, p in module.named_parameters()}
        tangents = {name: torch.randn_like(p) for name, p in params.items()}
        loss, jvp = torch.func.jvp(
            lambda p: F.cross_entropy(torch.func.functional_call(module, p, (x,)), y), (params,), (tangents,)
        )
        for name, p in module.named_parameters():
            p.grad = tangents[name] * jvp
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), args.clip)
        opt.step()
        sched.step()
    return float(loss)


# ----------------------------------------------------------------------------- after: duogard, torch


def ported_torch(module, data, args):
    """The same loop; ``forward_grad_`` replaces the tangent, JVP and ``p.grad`` lines."""
    opt, sched = torch_optimizer(module, args)
    keys = dg.torch.KeySequence(args.seed)
    for x, y in data.batches(args.batch_size, seed=args.seed, steps=args.steps):
        batch = (torch.from_numpy(x), torch.from_numpy(y))
        loss = dg.torch.forward_grad_(
            module, loss_fn, batch, method=args.grad, key=keys, **estimator_options(args)
        )
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), args.clip)
        opt.step()
        sched.step()
    return loss.item()


# ----------------------------------------------------------------------------- after: duogard, JAX


def ported_jax(module, data, args):
    """The same training on JAX: ``from_torch``, a duogard estimator and optimizer, one ``jax.jit``."""
    import jax

    be = dg.backend("jax")
    model = dg.from_torch(module, data.example_input)  # traced + lowered with torch.fx
    est = dg.estimator(args.grad, **estimator_options(args))
    sgd = dg.optim.sgd(
        learning_rate=dg.optim.exponential_decay(args.lr, rate=args.decay), momentum=args.momentum
    )
    tx = dg.optim.chain(dg.optim.clip_by_global_norm(args.clip), sgd) if args.clip > 0 else sgd

    def objective(params, batch):
        return dg.losses.cross_entropy(model.apply(params, batch[0]), batch[1])

    @jax.jit
    def step(params, state, batch, base, i):
        loss, grads = est(objective, params, batch, be.fold_in(base, i))
        updates, state = tx.update(grads, state, params)
        return dg.optim.apply_updates(params, updates), state, loss

    params = {k: be.asarray(v) for k, v in model.trainable().items()}  # NumPy -> JAX
    state, base = tx.init(params), be.key(args.seed)
    for i, (x, y) in enumerate(data.batches(args.batch_size, seed=args.seed, steps=args.steps)):
        params, state, loss = step(params, state, (be.asarray(x), be.asarray(y)), base, i)
    dg.to_torch({**model.params, **params}, module)  # back into the nn.Module
    return float(loss)


# ----------------------------------------------------------------------------- driver


def estimator_options(args) -> dict:
    """The forward estimator's options from the command line (none for the other methods)."""
    if args.grad != "forward":
        return {}
    return {"num_tangents": args.num_tangents, "distribution": args.distribution}


@torch.no_grad()
def accuracy(module, data) -> float:
    """Test accuracy of the module (argmax of its logits)."""
    module.eval()
    pred = module(torch.from_numpy(data.x_test)).argmax(dim=1).numpy()
    module.train()
    return float(np.mean(pred == data.y_test))


def main(argv=None):
    """Parse the command line, run the hand-written loop and the port, print both; return 0."""
    d = FWDGRAD_SETTINGS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["torch", "jax"], default="torch")
    p.add_argument("--grad", default="forward", help="forward | backprop | forward-exact")
    p.add_argument("--model", choices=MODELS, default="logreg", help="fwdgrad's mlp, logreg, cnn, or small-*")
    p.add_argument(
        "--data-dir", default=None, help="a folder of MNIST's IDX files (default: digits at 28x28)"
    )
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--lr", type=float, default=d["lr"], help="fwdgrad: 2e-4")
    p.add_argument("--momentum", type=float, default=d["momentum"], help="fwdgrad: 0")
    p.add_argument(
        "--decay", type=float, default=d["decay"], help="lr(t) = lr * exp(-decay * t); fwdgrad: 1e-4"
    )
    p.add_argument(
        "--clip", type=float, default=d["clip"], help="clip_grad_norm_ max norm (0: none, fwdgrad's)"
    )
    p.add_argument("--num-tangents", type=int, default=1, help="forward: tangents per step")
    p.add_argument("--distribution", choices=["normal", "rademacher"], default="normal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hand-written", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    for flag in ("steps", "batch_size", "lr"):
        if not getattr(args, flag) > 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    torch.set_num_threads(args.threads)
    data, what = load_data(args.model, args.data_dir, args.seed)
    runs = [] if args.skip_hand_written else [("hand-written torch.func.jvp loop", hand_written)]
    port = ported_torch if args.backend == "torch" else ported_jax
    runs.append((f"duogard port ({args.backend}, --grad {args.grad})", port))
    print(
        f"{args.model} on {what}, {args.steps} steps, batch {args.batch_size}, SGD lr {args.lr:g} "
        f"(momentum {args.momentum:g}) * exp(-{args.decay:g} step), clip {args.clip:g}"
    )
    for title, train in runs:
        module = make_module(args.model, args.seed)  # the same initial weights for every run
        before = accuracy(module, data)
        start = time.perf_counter()
        loss = train(module, data, args)
        seconds = time.perf_counter() - start
        print(
            f"  {title:<45} loss {loss:.4f}  test accuracy {before:.3f} -> {accuracy(module, data):.3f}"
            f"  ({seconds:.1f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
