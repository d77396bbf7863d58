"""The original release's way of computing ReActNet-A, kept only as the baseline of
`python -m utils.bench iteration`.

This is a re-implementation of the authors' `step1/reactnet.py` and `step2/reactnet.py`
(AdamBNN; identical to ReActNet's `mobilenet/` code apart from parameter names) that computes
what they compute, the way they compute it, in float32:

- `BinaryActivation`: sign forward, and the ApproxSign gradient obtained by running autograd
  over elementwise arithmetic with float32 masks and the
  `out_forward.detach() - out3.detach() + out3` straight-through trick;
- `HardBinaryConv` (step 2): the scaling factor as nested means of |W|, `.detach()`, `sign`,
  the `clamp(W, -1, 1)` straight-through trick, then `F.conv2d`;
- `LearnableBias` with `expand_as`, a separate `nn.PReLU`, in-place `+=` shortcuts;
- step 1 uses plain `nn.Conv2d` for the block convolutions.

One difference that only matters at a single point: `torch.clamp`'s gradient at the bounds is 0
in the PyTorch used here and 1 in the authors' PyTorch 1.7, so at |W| = 1 exactly this baseline
passes no gradient where the original (and `models.BinaryWeight`) passes it. The code path, and
so the cost, is the original's.

Module and parameter names equal those of `models.reactnet_a`, so weights copy over with
`load_state_dict(strict=True)` and both networks compute the same logits and gradients
(tests/test_bench.py checks this in float64). The training code never uses this module.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.reactnet import STAGE_WIDTHS

__all__ = ["BinaryActivation", "LearnableBias", "HardBinaryConv", "BasicBlock", "firstconv3x3",
           "reactnet", "baseline_reactnet_a", "baseline_train_step"]


class firstconv3x3(nn.Module):
    def __init__(self, inp, oup, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, oup, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(oup)

    def forward(self, x):
        out = self.conv1(x)
        out = self.bn1(out)
        return out


class BinaryActivation(nn.Module):
    def forward(self, x):
        out_forward = torch.sign(x)
        mask1 = x < -1
        mask2 = x < 0
        mask3 = x < 1
        out1 = (-1) * mask1.type(torch.float32) + (x * x + 2 * x) * (1 - mask1.type(torch.float32))
        out2 = out1 * mask2.type(torch.float32) + (-x * x + 2 * x) * (1 - mask2.type(torch.float32))
        out3 = out2 * mask3.type(torch.float32) + 1 * (1 - mask3.type(torch.float32))
        out = out_forward.detach() - out3.detach() + out3
        return out


class LearnableBias(nn.Module):
    def __init__(self, out_chn):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, out_chn, 1, 1), requires_grad=True)

    def forward(self, x):
        out = x + self.bias.expand_as(x)
        return out


class HardBinaryConv(nn.Module):
    def __init__(self, in_chn, out_chn, kernel_size=3, stride=1, padding=1):
        super().__init__()
        self.stride = stride
        self.padding = padding
        self.shape = (out_chn, in_chn, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.rand(self.shape) * 0.001, requires_grad=True)

    def forward(self, x):
        real_weights = self.weight
        scaling_factor = torch.mean(torch.mean(torch.mean(abs(real_weights), dim=3, keepdim=True),
                                               dim=2, keepdim=True), dim=1, keepdim=True)
        scaling_factor = scaling_factor.detach()
        binary_weights_no_grad = scaling_factor * torch.sign(real_weights)
        cliped_weights = torch.clamp(real_weights, -1.0, 1.0)
        binary_weights = binary_weights_no_grad.detach() - cliped_weights.detach() + cliped_weights
        y = F.conv2d(x, binary_weights, stride=self.stride, padding=self.padding)
        return y


def _conv(in_planes, out_planes, kernel_size, stride, binary_weights):
    if binary_weights:  # step 2: HardBinaryConv
        return HardBinaryConv(in_planes, out_planes, kernel_size, stride, padding=kernel_size // 2)
    # step 1: plain real-valued convolutions
    return nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding=kernel_size // 2, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, binary_weights=True):
        super().__init__()
        norm_layer = nn.BatchNorm2d
        self.move11 = LearnableBias(inplanes)
        self.binary_3x3 = _conv(inplanes, inplanes, 3, stride, binary_weights)
        self.bn1 = norm_layer(inplanes)
        self.move12 = LearnableBias(inplanes)
        self.prelu1 = nn.PReLU(inplanes)
        self.move13 = LearnableBias(inplanes)
        self.move21 = LearnableBias(inplanes)
        if inplanes == planes:
            self.binary_pw = _conv(inplanes, planes, 1, 1, binary_weights)
            self.bn2 = norm_layer(planes)
        else:
            self.binary_pw_down1 = _conv(inplanes, inplanes, 1, 1, binary_weights)
            self.binary_pw_down2 = _conv(inplanes, inplanes, 1, 1, binary_weights)
            self.bn2_1 = norm_layer(inplanes)
            self.bn2_2 = norm_layer(inplanes)
        self.move22 = LearnableBias(planes)
        self.prelu2 = nn.PReLU(planes)
        self.move23 = LearnableBias(planes)
        self.binary_activation = BinaryActivation()
        self.stride = stride
        self.inplanes = inplanes
        self.planes = planes
        if self.inplanes != self.planes:
            self.pooling = nn.AvgPool2d(2, 2)

    def forward(self, x):
        out1 = self.move11(x)
        out1 = self.binary_activation(out1)
        out1 = self.binary_3x3(out1)
        out1 = self.bn1(out1)
        if self.stride == 2:
            x = self.pooling(x)
        out1 = x + out1
        out1 = self.move12(out1)
        out1 = self.prelu1(out1)
        out1 = self.move13(out1)

        out2 = self.move21(out1)
        out2 = self.binary_activation(out2)
        if self.inplanes == self.planes:
            out2 = self.binary_pw(out2)
            out2 = self.bn2(out2)
            out2 += out1
        else:
            assert self.planes == self.inplanes * 2
            out2_1 = self.binary_pw_down1(out2)
            out2_2 = self.binary_pw_down2(out2)
            out2_1 = self.bn2_1(out2_1)
            out2_2 = self.bn2_2(out2_2)
            out2_1 += out1
            out2_2 += out1
            out2 = torch.cat([out2_1, out2_2], dim=1)
        out2 = self.move22(out2)
        out2 = self.prelu2(out2)
        out2 = self.move23(out2)
        return out2


class reactnet(nn.Module):
    def __init__(self, num_classes=1000, binary_weights=True):
        super().__init__()
        stage_out_channel = list(STAGE_WIDTHS)
        self.binary_weights = binary_weights
        self.feature = nn.ModuleList()
        for i in range(len(stage_out_channel)):
            if i == 0:
                self.feature.append(firstconv3x3(3, stage_out_channel[i], 2))
            elif stage_out_channel[i - 1] != stage_out_channel[i] and stage_out_channel[i] != 64:
                self.feature.append(BasicBlock(stage_out_channel[i - 1], stage_out_channel[i], 2,
                                               binary_weights))
            else:
                self.feature.append(BasicBlock(stage_out_channel[i - 1], stage_out_channel[i], 1,
                                               binary_weights))
        self.pool1 = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        for block in self.feature:
            x = block(x)
        x = self.pool1(x)
        x = x.view(x.size(0), -1)
        x = self.fc(x)
        return x


def baseline_reactnet_a(binary_weights: bool = True, num_classes: int = 1000) -> reactnet:
    """The original's network: step 1 with `binary_weights=False`, step 2 with `True`."""
    return reactnet(num_classes=num_classes, binary_weights=binary_weights)


def baseline_train_step(student, teacher, images, criterion, optimizer):
    """One iteration of the original training loop (`train()` in the authors' train.py): student
    forward, teacher forward (frozen parameters, outside no_grad, as there), loss, zero_grad,
    backward, step. Returns (loss, student_logits)."""
    logits_student = student(images)
    logits_teacher = teacher(images)
    loss = criterion(logits_student, logits_teacher)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach(), logits_student.detach()
