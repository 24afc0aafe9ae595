"""A small CNN for 28x28 grey images (Fashion-MNIST / MNIST): 55k parameters with the defaults."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Sequential):
    def __init__(
        self,
        in_features: int = 1,
        out_features: int = 10,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 32,
        image_size: int = 28,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        c1, c2 = channels
        flat = c2 * (image_size // 4) ** 2
        super().__init__(
            nn.Conv2d(in_features, c1, 3, padding=1, dtype=dtype),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, dtype=dtype),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(flat, hidden, dtype=dtype),
            nn.ReLU(),
            nn.Linear(hidden, out_features, dtype=dtype),
        )
        if generator is not None:  # seeded uniform fan-in init, so one seed fixes the model
            with torch.no_grad():
                for layer in self:
                    if isinstance(layer, (nn.Conv2d, nn.Linear)):
                        fan_in = layer.weight[0].numel()
                        layer.weight.uniform_(-(fan_in**-0.5), fan_in**-0.5, generator=generator)
                        if layer.bias is not None:
                            layer.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate representation (used by MOON's contrastive term)."""
        for layer in list(self)[:-1]:
            x = layer(x)
        return x

    def layer_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The logits and the representation at every level before its ReLU (FedRCL's per-layer contrastive
        terms): both convolutions and the hidden linear layer. The logits are those of `forward`, bit for bit."""
        levels = []
        for layer in self:
            if isinstance(layer, nn.ReLU):
                levels.append(x)
            x = layer(x)
        return x, levels
