"""ReActNet-A (Liu et al., ECCV 2020) as trained by AdamBNN (Liu et al., ICML 2021).

Module and parameter names are those of the released checkpoints, so their state_dicts load
strictly; step 1 and step 2 differ only in `BinaryConv2d.binary_weights`.
"""
import torch
import torch.nn as nn

from .binary import BinaryConv2d, LearnableBias, _iadd, prelu_bias

__all__ = ["STAGE_WIDTHS", "FirstConv", "BasicBlock", "ReActNetA", "reactnet_a"]

# Index 0 is the real-valued stem; every later index is a block from the previous width.
STAGE_WIDTHS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)


class FirstConv(nn.Module):
    """Real-valued stem: 3x3 conv, stride 2, no bias, then BatchNorm (no activation)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return self.bn1(self.conv1(x))


class BasicBlock(nn.Module):
    """One ReActNet-A block: RSign -> binary 3x3 conv -> BN (+ shortcut) -> RPReLU,
    then RSign -> binary 1x1 conv(s) -> BN (+ shortcut) -> RPReLU.

    When the width doubles, the 1x1 part is two C->C convs whose outputs (each plus the same
    shortcut) are concatenated.
    """

    def __init__(self, inplanes: int, planes: int, stride: int, binary_weights: bool):
        super().__init__()
        if planes not in (inplanes, 2 * inplanes):
            raise ValueError(f"a block keeps or doubles its width, got {inplanes} -> {planes}")
        self.inplanes, self.planes, self.stride = inplanes, planes, stride
        self.move11 = LearnableBias(inplanes)
        self.binary_3x3 = BinaryConv2d(inplanes, inplanes, 3, stride, binary_weights)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.move12 = LearnableBias(inplanes)
        self.prelu1 = nn.PReLU(inplanes)
        self.move13 = LearnableBias(inplanes)
        self.move21 = LearnableBias(inplanes)
        if inplanes == planes:
            self.binary_pw = BinaryConv2d(inplanes, planes, 1, 1, binary_weights)
            self.bn2 = nn.BatchNorm2d(planes)
        else:
            self.binary_pw_down1 = BinaryConv2d(inplanes, inplanes, 1, 1, binary_weights)
            self.binary_pw_down2 = BinaryConv2d(inplanes, inplanes, 1, 1, binary_weights)
            self.bn2_1 = nn.BatchNorm2d(inplanes)
            self.bn2_2 = nn.BatchNorm2d(inplanes)
        self.move22 = LearnableBias(planes)
        self.prelu2 = nn.PReLU(planes)
        self.move23 = LearnableBias(planes)
        self.pooling = nn.AvgPool2d(2, 2) if stride == 2 else nn.Identity()

    def forward(self, x):
        # The sums are accumulated into the BatchNorm outputs (and the concatenation), whose
        # backward passes do not need them: the same values as out-of-place additions in the
        # same order, without the full-size temporaries.
        out1 = _iadd(_iadd(self.bn1(self.binary_3x3(self.move11(x))), self.pooling(x)),
                     self.move12.bias)
        out1 = prelu_bias(out1, self.prelu1.weight, self.move13.bias)

        u = self.move21(out1)
        if self.inplanes == self.planes:
            out2 = _iadd(self.bn2(self.binary_pw(u)), out1)
        else:
            out2 = torch.cat([_iadd(self.bn2_1(self.binary_pw_down1(u)), out1),
                              _iadd(self.bn2_2(self.binary_pw_down2(u)), out1)], dim=1)
        out2 = _iadd(out2, self.move22.bias)
        return prelu_bias(out2, self.prelu2.weight, self.move23.bias)


class ReActNetA(nn.Module):
    """ReActNet-A: real stem, 13 binary blocks, average pool, real-valued fc.

    `binary_weights=False` is the step-1 network (binary activations, real block convs),
    `True` the step-2 network (binary weights and activations).
    """

    def __init__(self, binary_weights: bool = True, num_classes: int = 1000):
        super().__init__()
        self.binary_weights = binary_weights
        self.feature = nn.ModuleList([FirstConv(3, STAGE_WIDTHS[0], 2)])
        for inplanes, planes in zip(STAGE_WIDTHS[:-1], STAGE_WIDTHS[1:]):
            # Width changes halve the resolution, except the first block (32 -> 64).
            stride = 2 if inplanes != planes and planes != 64 else 1
            self.feature.append(BasicBlock(inplanes, planes, stride, binary_weights))
        self.pool1 = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(STAGE_WIDTHS[-1], num_classes)

    def forward(self, x):
        return self.fc(self.features(x))

    def features(self, x):
        """The pooled features of x, the fc's input: [n, 1024]."""
        for layer in self.feature:
            x = layer(x)
        return torch.flatten(self.pool1(x), 1)


def reactnet_a(binary_weights: bool = True, num_classes: int = 1000) -> ReActNetA:
    """Build ReActNet-A: step 1 with `binary_weights=False`, step 2 with `True`."""
    return ReActNetA(binary_weights=binary_weights, num_classes=num_classes)
