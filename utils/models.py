"""The small models every chapter uses, sized for 28×28 (MNIST) or 8×8 (digits) inputs.

* :class:`LeNet300100` and :class:`LeNet5` — the two MNIST networks of Deep
  Compression (Han, Mao & Dally, ICLR 2016): 266,610 and 431,080 parameters.
* :class:`SmallResNet` — a ResNet-style CNN (He et al. 2016) with basic blocks.
* :class:`SmallMobileNet` — a MobileNet-style CNN (Howard et al. 2017) built from
  depthwise separable convolutions, with a width multiplier.

Every model has ``fuse_groups()``: the lists of module names (conv, BN, ReLU) that
``torch.ao.quantization.fuse_modules`` can fuse, so static INT8 works in eager mode.
Residual additions use ``FloatFunctional`` so that the quantized model can add
INT8 tensors.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional

from utils.validation import check_choice, check_float, check_int

MODEL_NAMES = ("lenet300", "lenet5", "resnet", "mobilenet")


class LeNet300100(nn.Module):
    """Fully connected 784-300-100-10 network (LeCun et al. 1998)."""

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        check_int("in_features", in_features, minimum=1)
        check_int("num_classes", num_classes, minimum=2)
        self.flatten = nn.Flatten()
        self.fc1, self.relu1 = nn.Linear(in_features, 300), nn.ReLU()
        self.fc2, self.relu2 = nn.Linear(300, 100), nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        return self.fc3(self.relu2(self.fc2(x)))

    def fuse_groups(self) -> list[list[str]]:
        return [["fc1", "relu1"], ["fc2", "relu2"]]


class LeNet5(nn.Module):
    """Caffe's LeNet-5 as used by Deep Compression: conv 20@5×5, conv 50@5×5, fc 500, fc 10."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> None:
        super().__init__()
        check_int("in_channels", in_channels, minimum=1)
        check_int("num_classes", num_classes, minimum=2)
        check_int("input_size", input_size, minimum=16)
        side = ((input_size - 4) // 2 - 4) // 2
        self.conv1, self.pool1 = nn.Conv2d(in_channels, 20, 5), nn.MaxPool2d(2)
        self.conv2, self.pool2 = nn.Conv2d(20, 50, 5), nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1, self.relu = nn.Linear(50 * side * side, 500), nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(self.flatten(x))))

    def fuse_groups(self) -> list[list[str]]:
        return [["fc1", "relu"]]


class ConvBNReLU(nn.Sequential):
    """``Conv2d`` (no bias) → ``BatchNorm2d`` → ``ReLU``; ``groups`` makes it depthwise."""

    def __init__(
        self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convolutions and an identity (or 1×1) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1, self.relu1 = nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.skip = FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.skip.add_relu(out, self.shortcut(x))

    def fuse_groups(self, prefix: str) -> list[list[str]]:
        groups = [[f"{prefix}conv1", f"{prefix}bn1", f"{prefix}relu1"]]
        groups.append([f"{prefix}conv2", f"{prefix}bn2"])
        if len(self.shortcut) == 2:
            groups.append([f"{prefix}shortcut.0", f"{prefix}shortcut.1"])
        return groups


class SmallResNet(nn.Module):
    """ResNet-style CNN: a 3×3 stem, three stages of basic blocks (stride 1, 2, 2), pooling, FC.

    Args:
        widths: channels of the three stages.
        blocks: basic blocks per stage.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (16, 32, 64),
        blocks: int = 1,
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels, minimum=1)
        check_int("num_classes", num_classes, minimum=2)
        check_int("blocks", blocks, minimum=1)
        if len(widths) != 3 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be three positive ints, got {widths}")
        self.stem = ConvBNReLU(in_channels, widths[0])
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, stride=2 if (i > 0 and b == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))

    def fuse_groups(self) -> list[list[str]]:
        groups = [["stem.0", "stem.1", "stem.2"]]
        for i, block in enumerate(self.layers):
            groups += block.fuse_groups(f"layers.{i}.")
        return groups


class SmallMobileNet(nn.Module):
    """MobileNet-style CNN: a stem, then depthwise 3×3 + pointwise 1×1 blocks.

    Args:
        width_mult: multiplies every channel count (MobileNet's α).
    """

    STAGES = ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1))

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width_mult: float = 1.0):
        super().__init__()
        check_int("in_channels", in_channels, minimum=1)
        check_int("num_classes", num_classes, minimum=2)
        check_float("width_mult", width_mult, 0.0, 4.0, min_inclusive=False)

        def ch(c: int) -> int:
            return max(4, int(round(c * width_mult)))

        cin = ch(16)
        layers: list[nn.Module] = [ConvBNReLU(in_channels, cin)]
        for c, stride in self.STAGES:
            layers.append(ConvBNReLU(cin, cin, 3, stride, groups=cin))  # depthwise
            layers.append(ConvBNReLU(cin, ch(c), 1))  # pointwise
            cin = ch(c)
        self.features = nn.Sequential(*layers)
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))

    def fuse_groups(self) -> list[list[str]]:
        return [
            [f"features.{i}.0", f"features.{i}.1", f"features.{i}.2"]
            for i in range(len(self.features))
        ]


def build_model(
    name: str, in_channels: int = 1, num_classes: int = 10, input_size: int = 28, **kwargs
) -> nn.Module:
    """Build a model of this module by name: one of ``MODEL_NAMES``."""
    check_choice("name", name, MODEL_NAMES)
    check_int("input_size", input_size, minimum=1)
    if name == "lenet300":
        return LeNet300100(in_channels * input_size * input_size, num_classes, **kwargs)
    if name == "lenet5":
        return LeNet5(in_channels, num_classes, input_size, **kwargs)
    if name == "resnet":
        return SmallResNet(in_channels, num_classes, **kwargs)
    return SmallMobileNet(in_channels, num_classes, **kwargs)
