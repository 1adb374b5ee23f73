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

import sys

from duogard.cli.train import main as train_main

#: this script's defaults; every other flag is ``duogard train``'s (learning rates: its table)
DEFAULTS = {"model": "mlp", "dataset": "auto", "steps": 2000, "decay": 1e-4}


def main(argv=None) -> int:
    """Parse the command line, train, print the results; return the exit code."""
    return train_main(argv, prog="mnist_mlp.py", description=__doc__, defaults=DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
