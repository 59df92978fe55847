"""Residual networks for small images (CIFAR-style): resnet20/resnet110 and resnet18.

- ``cifar_resnet(depth)``: He et al. 2016, "Deep Residual Learning for Image Recognition", section 4.2.
  A 3x3 stem with 16 channels, three stages of n BasicBlocks with 16/32/64 channels (strides 1, 2, 2),
  global average pooling, one linear layer: 6n+2 weighted layers (n=3: resnet20, n=18: resnet110).
  Shortcuts are option A, as in the paper's CIFAR experiments: identity, and where a block halves the
  image and doubles the channels, the input is subsampled by 2 and zero-padded with the new channels
  (no parameters). 0.27M parameters for resnet20, 1.7M for resnet110 (10 classes).
- ``resnet18()``: ResNet-18 as commonly trained on CIFAR (kuangliu/pytorch-cifar): a 3x3 stem with 64
  channels and no max-pool, four stages of two BasicBlocks with 64/128/256/512 channels (strides 1, 2, 2, 2),
  option-B shortcuts (1x1 conv + BatchNorm) where the shape changes, global average pooling, linear:
  11.17M parameters for 10 classes.

Both take any number of input channels and any image size (global pooling makes the head size-free;
images of 8x8 or more keep every stage's feature map non-trivial). PyTorch's default initialization.
"""
import torch.nn.functional as F
from torch import nn


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (BatchNorm follows)."""
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option-A shortcut: x ↦ [x[:, :, ::s, ::s], 0], zero channels appended up to ``c_out``."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.extra, self.stride = c_out - c_in, stride

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]       # (B, c_in, ⌈H/s⌉, ⌈W/s⌉), as the strided conv
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))    # (B, c_out, ⌈H/s⌉, ⌈W/s⌉)


def projection(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """Option-B shortcut: 1x1 convolution with the block's stride, then BatchNorm."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """y = ReLU(BN(conv(ReLU(BN(conv_s(x))))) + shortcut(x)), two 3x3 convolutions, the first with stride s."""

    def __init__(self, c_in: int, c_out: int, stride: int, option: str):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = conv3x3(c_out, c_out), nn.BatchNorm2d(c_out)
        if stride == 1 and c_in == c_out:
            self.shortcut = nn.Identity()
        elif option == "A":
            self.shortcut = PadShortcut(c_in, c_out, stride)
        else:
            self.shortcut = projection(c_in, c_out, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """stem (3x3 conv → BN → ReLU) → stages of BasicBlocks → global average pool → linear."""

    def __init__(self, channels: int, num_outputs: int, widths: tuple[int, ...], blocks: int, option: str):
        super().__init__()
        self.stem = nn.Sequential(conv3x3(channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, c_in = [], widths[0]
        for i, c_out in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1, option)
                       for j in range(blocks)]
            c_in = c_out
        self.stages = nn.Sequential(*stages)          # (B, widths[-1], H / 2^(len−1), W / 2^(len−1))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, widths[-1])
        self.fc = nn.Linear(widths[-1], num_outputs)

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(x))))


def cifar_resnet(channels: int, num_outputs: int, depth: int) -> ResNet:
    """He et al.'s CIFAR ResNet with depth = 6n+2 layers (20, 32, 44, 56, 110, ...), option-A shortcuts."""
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n ≥ 1, got {depth}")
    return ResNet(channels, num_outputs, (16, 32, 64), blocks=(depth - 2) // 6, option="A")


def resnet18(channels: int, num_outputs: int) -> ResNet:
    """CIFAR-style ResNet-18: 64-128-256-512, two BasicBlocks per stage, option-B shortcuts."""
    return ResNet(channels, num_outputs, (64, 128, 256, 512), blocks=2, option="B")
