"""ResNet-20 for CIFAR (He et al., 2016, option-A identity shortcuts) with GroupNorm(2 groups) for BatchNorm.

GroupNorm keeps no running statistics, so every parameter is a plain weight the server can aggregate; the
FIPA paper uses this variant. 269,722 parameters for 10 classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def norm(channels: int, groups: int, dtype) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, dtype=dtype)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, dtype):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False, dtype=dtype)
        self.norm1 = norm(out_channels, groups, dtype)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False, dtype=dtype)
        self.norm2 = norm(out_channels, groups, dtype)
        self.stride, self.pad = stride, out_channels - in_channels

    def shortcut(self, x: Tensor) -> Tensor:
        # Option A: subsample and zero-pad the channels: no parameters in the shortcut.
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def pre_activation(self, x: Tensor) -> Tensor:
        """The block's output before its final ReLU."""
        out = F.relu(self.norm1(self.conv1(x)))
        return self.norm2(self.conv2(out)) + self.shortcut(x)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.pre_activation(x))


class ResNet20GN(nn.Module):
    def __init__(
        self,
        in_features: int = 3,
        out_features: int = 10,
        groups: int = 2,
        widths: tuple[int, int, int] = (16, 32, 64),
        blocks_per_stage: int = 3,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_features, widths[0], 3, 1, 1, bias=False, dtype=dtype)
        self.norm = norm(widths[0], groups, dtype)
        layers, channels = [], widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, width, stride, groups, dtype))
                channels = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, out_features, dtype=dtype)
        if generator is not None:  # Kaiming-normal convs, seeded
            with torch.no_grad():
                for module in self.modules():
                    if isinstance(module, nn.Conv2d):
                        fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
                        module.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=generator)
                    elif isinstance(module, nn.Linear):
                        bound = module.in_features**-0.5
                        module.weight.uniform_(-bound, bound, generator=generator)
                        module.bias.zero_()

    def features(self, x: Tensor) -> Tensor:
        """The penultimate representation (used by MOON's contrastive term)."""
        out = F.relu(self.norm(self.conv(x)))
        out = self.layers(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))

    def layer_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The logits and the representation at every level, before its ReLU (FedRCL's per-layer contrastive
        terms): the stem, and each stage's last block. The logits are those of `forward`, bit for bit."""
        stem = self.norm(self.conv(x))
        levels, out = [stem], F.relu(stem)
        blocks: list[BasicBlock] = list(self.layers)  # type: ignore[arg-type]
        for index, block in enumerate(blocks):
            pre = block.pre_activation(out)
            out = F.relu(pre)
            if index + 1 == len(blocks) or blocks[index + 1].stride != 1:  # a stage ends here
                levels.append(pre)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1)), levels
