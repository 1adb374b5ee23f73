"""The models of the experiments, by name (the ``--model`` flag)."""

from __future__ import annotations

from duogard import nn

__all__ = ["MODELS", "build_model"]

MODELS = ("logreg", "mlp", "cnn", "local-mlp", "local-mixer")


def build_model(
    name: str,
    num_classes: int,
    *,
    hidden: tuple[int, ...] | None = None,
    channels: int = 64,
    cnn_hidden: int = 1024,
    groups: int = 8,
    head_norm: bool = True,
    patch: int = 4,
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
    - ``local-mixer``: a LocalMixer (Ren, Kornblith, Liao, Hinton, ICLR 2023) at small sizes
      (default ``hidden=(64, 64, 64)``): the image cut into ``patch`` x ``patch`` patches
      (:class:`duogard.nn.Patches`), then one :class:`duogard.nn.Local` block per entry of
      ``hidden`` (its channels). Block 1 embeds the patches and mixes the channels; each later
      block mixes the tokens (:class:`duogard.nn.TokenLinear`), then the channels, and adds its
      input when the widths agree. Channel mixing is a Linear, then a
      :class:`duogard.nn.GroupedLinear` of ``groups`` groups; every linear layer has a
      LayerNorm (no affine) before and after it, then a ReLU. Each block's channels are split
      into ``groups`` groups, each with a head on the token-mean of its channels (patch-wise
      losses under the local estimators), the gradient stopped between blocks; then the
      token-mean, a LayerNorm and Linear(num_classes). Input NCHW, sides divisible by ``patch``.
    - ``cnn``: the CNN of Baydin et al.: four 3x3 convolutions with ``channels`` channels
      ("same" padding, ReLU), 2x2 max-pooling after the 2nd and 4th, a ``cnn_hidden`` hidden
      layer, then the classifier.
    """
    if hidden is None:
        hidden = (64, 64, 64) if name == "local-mixer" else (1024, 1024)
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
    if name == "local-mixer":
        return _local_mixer(num_classes, tuple(hidden), groups, head_norm, patch)
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


def _local_mixer(num_classes: int, hidden: tuple[int, ...], groups: int, head_norm: bool, patch: int):
    """Ren et al.'s LocalMixer (see :func:`build_model`)."""
    norm = lambda g=1: nn.LayerNorm(elementwise_affine=False, groups=g)  # noqa: E731
    local = dict(num_classes=num_classes, groups=groups, head_norm=head_norm)

    def channels(width: int) -> list:  # a Linear, then a grouped one; the groups stay apart after
        return [
            *(norm(), nn.Linear(width), norm(groups), nn.relu),
            *(norm(groups), nn.GroupedLinear(width, groups), norm(groups), nn.relu),
        ]

    blocks = [nn.Local(*channels(hidden[0]), **local)]  # its first Linear embeds the patches
    for before, width in zip(hidden, hidden[1:]):
        tokens = [norm(), nn.TokenLinear(), norm(), nn.relu]
        blocks.append(nn.Local(*tokens, *channels(width), residual=before == width, **local))
    return nn.Sequential(nn.Patches(patch), *blocks, nn.TokenMean(), norm(), nn.Linear(num_classes))
