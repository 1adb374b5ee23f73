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

import sys

from duogard.cli.train import main as train_main

#: this script's defaults; every other flag is ``duogard train``'s (learning rates: its table)
DEFAULTS = {"model": "cnn", "dataset": "auto", "steps": 1000, "decay": 1e-4}


def main(argv=None) -> int:
    """Parse the command line, train, print the results; return the exit code."""
    return train_main(argv, prog="mnist_cnn.py", description=__doc__, defaults=DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
