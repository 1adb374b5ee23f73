"""The MNIST MLP of Baydin et al. (2022), "Gradients without Backpropagation".

Reproduces their multi-layer perceptron experiment: an MLP 784-1024-1024-10 with ReLU,
trained by SGD with the exponential learning-rate decay ``lr * exp(-k * step)``, where the
gradient comes either from backprop or from a forward gradient ``g = (∇f·v) v`` (one JVP
with a random tangent ``v``, no backward pass), on JAX or PyTorch.

Data: ``--dataset mnist`` reads the four standard IDX files (raw or .gz) from ``--data-dir``
(default ``$DUOGARD_DATA_DIR``, else ``./data``). The default ``--dataset auto`` uses MNIST
when those files are there and otherwise falls back to scikit-learn's built-in ``digits``
(8x8 images, 1797 of them), so the script runs offline.

Defaults on digits are kept fast (a few seconds on 2 CPU cores). On MNIST the MLP has the
paper's hidden sizes (1024, 1024); on digits it is 64-128-10, since digits images have only
64 pixels and the paper's 1.1M-parameter MLP would make forward gradients needlessly slow
there. Pass ``--hidden 1024,1024`` to get the paper's MLP on digits too. The default
learning rates were tuned on digits; a forward gradient's variance grows with the number of
parameters, so on MNIST with the paper's MLP give forward a smaller ``--lr`` (e.g. 1e-4).

    python examples/mnist_mlp.py                                   # jax, backprop, digits
    python examples/mnist_mlp.py --backend torch --grad forward
    python examples/mnist_mlp.py --grad forward:num_tangents=16,distribution=rademacher,lr=0.03
    python examples/mnist_mlp.py --dataset mnist --data-dir ~/data/mnist --steps 5000
    python examples/mnist_mlp.py --dataset mnist --data-dir ~/data/mnist --grad forward --lr 1e-4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from duogard.train import build_model

if (_here := str(Path(__file__).resolve().parent)) not in sys.path:
    sys.path.insert(0, _here)  # there when run as a script, maybe not when imported (the tests)
from _common import run  # noqa: E402  the command line, data, training and printing

LEARNING_RATES = {  # SGD, when neither --lr nor the method's lr= is given (tuned on digits)
    "backprop": 0.2, "forward-exact": 0.2, "forward": 0.005, "forward-activity": 0.03}


def parse_hidden(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated positive ints, e.g. ``1024,1024``."""
    try:
        sizes = tuple(int(h) for h in text.split(",") if h.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive comma-separated ints, got {text!r}")
    return sizes


def add_arguments(p):
    """The network's own options: --hidden."""
    p.add_argument("--hidden", type=parse_hidden, default=None,
                   help="hidden sizes, comma-separated (default: 1024,1024 on MNIST, 128 on digits)")


def make_model(args, data):
    """The MLP (the paper's hidden sizes on MNIST, smaller on digits) and its title."""
    hidden = args.hidden or ((128,) if data.name == "digits" else (1024, 1024))
    sizes = "-".join(map(str, (data.x_train[0].size, *hidden, data.num_classes)))
    return build_model("mlp", data.num_classes, hidden=hidden), f"MLP {sizes}"


def main(argv=None) -> int:
    """Parse the command line, train, print the results; return the exit code."""
    return run(argv, doc=__doc__, script="mnist_mlp.py", steps=2000, learning_rates=LEARNING_RATES,
               make_model=make_model, add_arguments=add_arguments)


if __name__ == "__main__":
    sys.exit(main())
