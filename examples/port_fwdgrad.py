"""Port a fwdgrad-style PyTorch experiment to duogard, side by side.

The starting point is the usual forward-gradient experiment written by hand in PyTorch: an
``nn.Module`` (an MLP built with ``setattr`` in a loop, or a ConvNet with a functional
forward), ``torch.optim.SGD``, a ``LambdaLR`` exponential decay, ``clip_grad_norm_``, and a
loop that calls ``torch.func.jvp`` over ``functional_call`` and sets ``p.grad = v * jvp``.

- ``hand_written``: that loop, as users have it.
- ``ported_torch``: the same loop with the tangent/JVP lines replaced by one call,
  ``duogard.torch.forward_grad_`` (``--backend torch``); ``--grad`` switches the estimator.
- ``ported_jax``: the same module on JAX (``--backend jax``): ``duogard.from_torch`` lowers its
  forward onto duogard's ops (torch.fx), a duogard estimator and optimizer train it under one
  ``jax.jit``, and ``duogard.to_torch`` loads the result back into the module.

Run: ``python examples/port_fwdgrad.py --backend jax --grad forward --model cnn``
(digits, a few hundred steps: well under 30 s on two CPU cores).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import duogard as dg

# ----------------------------------------------------------------------------- the user's modules


class MLP(nn.Module):
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


def make_module(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLP() if name == "mlp" else ConvNet()


def loss_fn(module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y)


def torch_optimizer(module, args):
    opt = torch.optim.SGD(module.parameters(), lr=args.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: math.exp(-args.decay * step))
    return opt, sched


# ----------------------------------------------------------------------------- before: by hand


def hand_written(module, data, args):
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
        torch.nn.utils.clip_grad_norm_(module.parameters(), args.clip)
        opt.step()
        sched.step()
    return float(loss)


# ----------------------------------------------------------------------------- after: duogard, torch


def ported_torch(module, data, args):
    opt, sched = torch_optimizer(module, args)
    keys = dg.torch.KeySequence(args.seed)
    for x, y in data.batches(args.batch_size, seed=args.seed, steps=args.steps):
        batch = (torch.from_numpy(x), torch.from_numpy(y))
        loss = dg.torch.forward_grad_(
            module, loss_fn, batch, method=args.grad, key=keys, **estimator_options(args)
        )
        torch.nn.utils.clip_grad_norm_(module.parameters(), args.clip)
        opt.step()
        sched.step()
    return loss.item()


# ----------------------------------------------------------------------------- after: duogard, JAX


def ported_jax(module, data, args):
    import jax

    be = dg.backend("jax")
    model = dg.from_torch(module, data.example_input)  # traced + lowered with torch.fx
    est = dg.estimator(args.grad, **estimator_options(args))
    tx = dg.optim.chain(
        dg.optim.clip_by_global_norm(args.clip),
        dg.optim.sgd(learning_rate=dg.optim.exponential_decay(args.lr, rate=args.decay), momentum=0.9),
    )

    def objective(params, batch):
        return dg.losses.cross_entropy(model.apply(params, batch[0]), batch[1])

    @jax.jit
    def step(params, state, batch, key):
        loss, grads = est(objective, params, batch, key)
        updates, state = tx.update(grads, state, params)
        return dg.optim.apply_updates(params, updates), state, loss

    params = {k: be.asarray(v) for k, v in model.trainable().items()}  # NumPy -> JAX
    state, base = tx.init(params), be.key(args.seed)
    for i, (x, y) in enumerate(data.batches(args.batch_size, seed=args.seed, steps=args.steps)):
        params, state, loss = step(params, state, (be.asarray(x), be.asarray(y)), be.fold_in(base, i))
    dg.to_torch({**model.params, **params}, module)  # back into the nn.Module
    return float(loss)


# ----------------------------------------------------------------------------- driver


def estimator_options(args) -> dict:
    if args.grad != "forward":
        return {}
    return {"num_tangents": args.num_tangents, "distribution": args.distribution}


@torch.no_grad()
def accuracy(module, data) -> float:
    module.eval()
    pred = module(torch.from_numpy(data.x_test)).argmax(dim=1).numpy()
    module.train()
    return float(np.mean(pred == data.y_test))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["torch", "jax"], default="torch")
    p.add_argument("--grad", default="forward", help="forward | backprop | forward-exact | ...")
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--decay", type=float, default=1e-3, help="lr(t) = lr * exp(-decay * t)")
    p.add_argument("--clip", type=float, default=5.0, help="clip_grad_norm_ max norm")
    p.add_argument("--num-tangents", type=int, default=1, help="forward: tangents per step (try 4)")
    p.add_argument("--distribution", choices=["normal", "rademacher"], default="normal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hand-written", action="store_true")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (these models are tiny: one thread is fastest)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", False)

    data = dg.data.load("digits", seed=args.seed)
    runs = [] if args.skip_hand_written else [("hand-written torch.func.jvp loop", hand_written)]
    runs.append(
        (
            f"duogard port ({args.backend}, --grad {args.grad})",
            ported_torch if args.backend == "torch" else ported_jax,
        )
    )
    print(
        f"{args.model} on digits ({data.num_train} train / {data.num_test} test), {args.steps} steps, "
        f"batch {args.batch_size}"
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


if __name__ == "__main__":
    main()
