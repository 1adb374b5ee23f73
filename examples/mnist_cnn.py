"""The MNIST CNN of Baydin et al. (2022), "Gradients without Backpropagation".

Reproduces their convolutional-network experiment: four 3x3 convolutions with 64 channels
("same" padding, ReLU), 2x2 max-pooling after the 2nd and 4th, a 1024-unit hidden layer and
the 10-way classifier, trained by SGD with the exponential learning-rate decay
``lr * exp(-k * step)``, the gradient coming either from backprop or from a forward gradient
``g = (∇f·v) v`` (one JVP with a random tangent ``v``, no backward pass), on JAX or PyTorch.

Data: ``--dataset mnist`` reads the four standard IDX files (raw or .gz) from ``--data-dir``
(default ``$DUOGARD_DATA_DIR``, else ``./data``). The default ``--dataset auto`` uses MNIST
when those files are there and otherwise falls back to scikit-learn's built-in ``digits``
(8x8 images, 1797 of them), so the script runs offline.

Defaults on digits are kept fast (a few seconds on 2 CPU cores). On MNIST the network has the
paper's sizes (64 channels, 1024 hidden); on digits, whose images are 8x8, it is narrower
(16 channels, 128 hidden). Pass ``--channels 64 --cnn-hidden 1024`` for the paper's sizes on
digits too. A full MNIST run on CPU takes long: use a GPU, or a few hundred steps.

What to expect on digits with the defaults: backprop reaches about 96% test accuracy in
1000 steps. The forward gradient does not get off the initial plateau in that budget
(loss stays near ln 10): its step size must shrink with the number of parameters (about
17,000 here) to stay stable, while this network at its initial weights needs large steps
(backprop at the same learning rate stalls too). Perturbing activations instead of weights
does better: ``--grad forward-activity:layerwise=true,lr=0.02 --steps 5000`` gets to 45-60%
(the loss still falling); larger learning rates diverge.

    python examples/mnist_cnn.py                                   # jax, backprop, digits
    python examples/mnist_cnn.py --backend torch --grad forward
    python examples/mnist_cnn.py --grad forward-activity           # perturb activations, not weights
    python examples/mnist_cnn.py --dataset mnist --data-dir ~/data/mnist --steps 500
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
    "backprop": 0.2, "forward-exact": 0.2, "forward": 0.005, "forward-activity": 0.003}


def positive_int(text: str) -> int:
    """argparse type: a positive int."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def add_arguments(p):
    """The network's own options: --channels and --cnn-hidden."""
    p.add_argument("--channels", type=positive_int, default=None,
                   help="channels of each convolution (default: 64 on MNIST, 16 on digits)")
    p.add_argument("--cnn-hidden", type=positive_int, default=None,
                   help="units of the hidden linear layer (default: 1024 on MNIST, 128 on digits)")


def make_model(args, data):
    """The CNN (the paper's sizes on MNIST, narrower on digits) and its title."""
    small = data.name == "digits"
    channels = args.channels or (16 if small else 64)
    cnn_hidden = args.cnn_hidden or (128 if small else 1024)
    model = build_model("cnn", data.num_classes, channels=channels, cnn_hidden=cnn_hidden)
    return model, f"CNN 4 x conv3x3({channels}), linear {cnn_hidden}, {data.num_classes} classes"


def main(argv=None) -> int:
    """Parse the command line, train, print the results; return the exit code."""
    return run(argv, doc=__doc__, script="mnist_cnn.py", steps=1000, learning_rates=LEARNING_RATES,
               make_model=make_model, add_arguments=add_arguments)


if __name__ == "__main__":
    sys.exit(main())
