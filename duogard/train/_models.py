"""The models of the experiments, by name (the ``--model`` flag)."""

from __future__ import annotations

from duogard import nn

__all__ = ["MODELS", "build_model"]

MODELS = ("logreg", "mlp", "cnn", "local-mlp")


def build_model(
    name: str,
    num_classes: int,
    *,
    hidden: tuple[int, ...] = (1024, 1024),
    channels: int = 64,
    cnn_hidden: int = 1024,
    groups: int = 8,
    head_norm: bool = True,
) -> nn.Sequential:
    """A model for NCHW images (or flat vectors) with ``num_classes`` outputs.

    - ``logreg``: Flatten, Linear(num_classes).
    - ``mlp``: Flatten, then Linear(h) + ReLU for each h in ``hidden``, then Linear(num_classes)
      (Baydin et al.'s MNIST MLP is hidden=(1024, 1024)).
    - ``local-mlp``: the MLP for local losses: Flatten, then for each h in ``hidden`` a
      :class:`duogard.nn.Local` block of LayerNorm (no affine), Linear(h) and ReLU whose h units
      are split into ``groups`` groups, each with its own linear head on the group's units
      normalised (``head_norm``); then LayerNorm (no affine) and Linear(num_classes).
      End-to-end estimators train it as an MLP with LayerNorm (the heads stay idle); the local
      estimators (``local-*``, ``forward-guess``) use the heads.
    - ``cnn``: the CNN of Baydin et al.: four 3x3 convolutions with ``channels`` channels
      ("same" padding, ReLU), 2x2 max-pooling after the 2nd and 4th, a ``cnn_hidden`` hidden
      layer, then the classifier.
    """
    if name == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(num_classes))
    if name == "mlp":
        layers: list = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(h), nn.relu]
        return nn.Sequential(*layers, nn.Linear(num_classes))
    if name == "local-mlp":
        norm = lambda: nn.LayerNorm(elementwise_affine=False)  # noqa: E731
        local = dict(num_classes=num_classes, groups=groups, head_norm=head_norm)
        blocks = [nn.Local(norm(), nn.Linear(h), nn.relu, **local) for h in hidden]
        return nn.Sequential(nn.Flatten(), *blocks, norm(), nn.Linear(num_classes))
    if name == "cnn":
        conv = lambda: nn.Conv2d(channels, 3, padding="same")  # noqa: E731
        return nn.Sequential(
            conv(),
            nn.relu,
            conv(),
            nn.relu,
            nn.MaxPool2d(2),
            conv(),
            nn.relu,
            conv(),
            nn.relu,
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(cnn_hidden),
            nn.relu,
            nn.Linear(num_classes),
        )
    raise ValueError(f"model: unknown model {name!r}; expected one of {list(MODELS)}")
