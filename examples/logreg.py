"""Logistic regression on MNIST, Baydin et al. (2022), "Gradients without Backpropagation".

Reproduces their logistic-regression experiment: a linear classifier 784-10 with softmax
cross-entropy, trained by SGD with the exponential learning-rate decay ``lr * exp(-k * step)``,
the gradient coming either from backprop or from a forward gradient ``g = (∇f·v) v`` (one
JVP with a random tangent ``v``, no backward pass), on JAX or PyTorch.

Data: ``--dataset mnist`` reads the four standard IDX files (raw or .gz) from ``--data-dir``
(default ``$DUOGARD_DATA_DIR``, else ``./data``). The default ``--dataset auto`` uses MNIST
when those files are there and otherwise falls back to scikit-learn's built-in ``digits``
(8x8 images, 1797 of them: a 64-10 model), so the script runs offline. The defaults finish
in a few seconds on 2 CPU cores.

    python examples/logreg.py                                     # jax, backprop, digits
    python examples/logreg.py --backend torch --grad forward
    python examples/logreg.py --grad forward-exact                # the exact gradient, forward mode only
    python examples/logreg.py --dataset mnist --data-dir ~/data/mnist
"""

from __future__ import annotations

import sys

from duogard.cli.train import main as train_main

#: this script's defaults; every other flag is ``duogard train``'s (learning rates: its table)
DEFAULTS = {"model": "logreg", "dataset": "auto", "steps": 2000, "decay": 1e-4}


def main(argv=None) -> int:
    """Parse the command line, train, print the results; return the exit code."""
    return train_main(argv, prog="logreg.py", description=__doc__, defaults=DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
