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
from pathlib import Path

from duogard.train import build_model

if (_here := str(Path(__file__).resolve().parent)) not in sys.path:
    sys.path.insert(0, _here)  # there when run as a script, maybe not when imported (the tests)
from _common import run  # noqa: E402  the command line, data, training and printing

LEARNING_RATES = {  # SGD, when neither --lr nor the method's lr= is given (tuned on digits)
    "backprop": 0.5, "forward-exact": 0.5, "forward": 0.03, "forward-activity": 0.4}


def make_model(args, data):
    """The linear classifier and its title."""
    title = f"logistic regression {data.x_train[0].size}-{data.num_classes}"
    return build_model("logreg", data.num_classes), title


def main(argv=None) -> int:
    """Parse the command line, train, print the results; return the exit code."""
    return run(argv, doc=__doc__, script="logreg.py", steps=2000, learning_rates=LEARNING_RATES,
               make_model=make_model)


if __name__ == "__main__":
    sys.exit(main())
