"""The networks of fwdgrad's MNIST experiment, as plain ``torch.nn.Module`` s.

Written for duogard after the architectures of fwdgrad (Belotti, Angioni, Orobix, 2022, an
unofficial reimplementation of Baydin et al., *Gradients without Backpropagation*), which its
Hydra ``model`` configs instantiate with ``input_size`` and ``output_size``:

- :class:`NeuralNet`: fully connected layers of the sizes in ``hidden_sizes``, each followed by
  the activation (ReLU by default), then an output layer. ``hidden_sizes=[1024, 1024]`` is the
  MLP of the paper (784-1024-1024-10, 1,863,690 parameters); ``hidden_sizes=[]`` leaves only
  the output layer: logistic regression (784-10, 7,850 parameters). It takes flattened images.
- :class:`ConvNet`: four 3x3 convolutions of 64 channels (padding 1) with ReLU, a 2x2 max-pool
  after the second and the fourth, a 1024-unit layer and the output layer (28x28 inputs:
  64 * 7 * 7 = 3136 features before ``fc1``; 3,333,962 parameters).

The weights start from PyTorch's default initialisation under ``torch.manual_seed``. The
same modules run on JAX through ``duogard.from_torch`` (lowered from ``torch.fx``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NeuralNet", "ConvNet"]


def _positive_int(where: str, arg: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {arg} must be an int >= 1, got {value!r}")
    return value


class NeuralNet(nn.Module):
    """A multilayer perceptron on flattened inputs (logistic regression with no hidden layer).

    Args:
        input_size: the number of input features (784 for 28x28 images).
        hidden_sizes: the width of each hidden layer, in order (``[]``: none).
        output_size: the number of classes.
        activation_function: the module applied after each hidden layer (default
            ``nn.ReLU()``); one instance is shared by all layers, as Hydra's recursive
            instantiation of fwdgrad's config makes it.
    """

    #: the data loader flattens the images for this model (fwdgrad's ``torch.flatten`` transform)
    flat_input = True

    def __init__(
        self,
        input_size: int,
        hidden_sizes: Sequence[int] = (1024, 1024),
        output_size: int = 10,
        activation_function: nn.Module | None = None,
    ):
        super().__init__()
        where = "NeuralNet"
        _positive_int(where, "input_size", input_size)
        _positive_int(where, "output_size", output_size)
        if isinstance(hidden_sizes, (str, bytes)) or not isinstance(hidden_sizes, Sequence):
            raise TypeError(
                f"{where}: hidden_sizes must be a list of ints (e.g. [1024, 1024], or [] for "
                f"logistic regression), got {type(hidden_sizes).__name__}"
            )
        sizes = [int(_positive_int(where, f"hidden_sizes[{i}]", h)) for i, h in enumerate(hidden_sizes)]
        if activation_function is not None and not isinstance(activation_function, nn.Module):
            raise TypeError(
                f"{where}: activation_function must be a torch.nn.Module (e.g. nn.ReLU()), "
                f"got {type(activation_function).__name__}"
            )
        self.input_size = input_size
        self.hidden_sizes = tuple(sizes)
        act = activation_function if activation_function is not None else nn.ReLU()
        widths = [input_size, *sizes]
        for i in range(len(sizes)):
            setattr(self, f"fc{i}", nn.Linear(widths[i], widths[i + 1]))
            setattr(self, f"act{i}", act)
        self.out = nn.Linear(widths[-1], output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, output_size)`` for inputs of shape ``(batch, input_size)``."""
        for i in range(len(self.hidden_sizes)):
            x = getattr(self, f"act{i}")(getattr(self, f"fc{i}")(x))
        return self.out(x)


class ConvNet(nn.Module):
    """The 64-channel convolutional network of the MNIST experiment (28x28 inputs).

    Args:
        input_size: the number of input channels (1 for MNIST).
        output_size: the number of classes.
    """

    flat_input = False

    def __init__(self, input_size: int = 1, output_size: int = 10):
        super().__init__()
        _positive_int("ConvNet", "input_size", input_size)
        _positive_int("ConvNet", "output_size", output_size)
        self.conv1 = nn.Conv2d(input_size, 64, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 1024)
        self.fc2 = nn.Linear(1024, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, output_size)`` for images of shape ``(batch, C, 28, 28)``."""
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.max_pool2d(F.relu(self.conv4(F.relu(self.conv3(x)))), 2)
        x = x.view(x.shape[0], -1)
        return self.fc2(F.relu(self.fc1(x)))
