"""Small built-in networks: linear, mlp, lenet, convnet.

Each builder takes the input shape already checked by the registry (``flatcli.models``) and the number of
outputs, and returns a freshly initialized ``nn.Module`` (PyTorch's default initialization, drawn from the
global RNG).
"""
import math

from torch import nn


def linear(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """f(x) = W flatten(x) + b, with W of shape (num_outputs, prod(input_shape))."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_outputs))


def mlp(input_shape: tuple[int, ...], num_outputs: int, width: int, depth: int) -> nn.Module:
    """flatten, then ``depth`` hidden layers h ← ReLU(W h + b) of ``width`` units, then a linear head.

    ``depth=0`` is the linear model.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, num_outputs))
    return nn.Sequential(*layers)


def lenet_feature_size(height: int, width: int) -> tuple[int, int]:
    """Spatial size after conv5 → pool2 → conv5 → pool2 (no padding): s ↦ ⌊(⌊(s−4)/2⌋ − 4)/2⌋."""
    def side(s: int) -> int:
        return ((s - 4) // 2 - 4) // 2
    return side(height), side(width)


class LeNet(nn.Module):
    """LeNet-5 as in Caffe's MNIST example: conv 20 (5x5) → maxpool 2 → conv 50 (5x5) → maxpool 2 → fc 500 → out.

    ReLU follows each convolution and the fc 500 layer (Caffe's original has it after fc 500 only; the
    ReLUs after the convolutions are the common PyTorch form and change no parameter count). The size of the
    flattened features is computed from the input shape: 50·4·4 = 800 for 28x28, 50·5·5 = 1250 for 32x32;
    images need at least 16x16 (16 → 12 → 6 → 2 → 1).
    """

    def __init__(self, channels: int, height: int, width: int, num_outputs: int):
        super().__init__()
        fh, fw = lenet_feature_size(height, width)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 20, 5), nn.ReLU(), nn.MaxPool2d(2),  # (B, 20, (H−4)/2, (W−4)/2)
            nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),        # (B, 50, fh, fw)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(50 * fh * fw, 500), nn.ReLU(), nn.Linear(500, num_outputs),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """conv 3x3 (padding 1, no bias: BatchNorm supplies the shift) → BatchNorm → ReLU → maxpool 2."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2),
    )


class ConvNet(nn.Module):
    """A small convolutional net with BatchNorm, in the spirit of the entropic-algorithms papers' SmallConvNet.

    Three blocks conv-BN-ReLU-maxpool with width/4, width/2, width channels (32, 64, 128 at the default
    width 128), global average pooling, one linear layer. The three poolings need images of at least 8x8.
    """

    def __init__(self, channels: int, num_outputs: int, width: int = 128):
        super().__init__()
        c1, c2, c3 = max(1, width // 4), max(1, width // 2), width
        self.features = nn.Sequential(
            conv_block(channels, c1), conv_block(c1, c2), conv_block(c2, c3),  # (B, c3, H/8, W/8)
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),                              # (B, c3)
        )
        self.head = nn.Linear(c3, num_outputs)

    def forward(self, x):
        return self.head(self.features(x))
