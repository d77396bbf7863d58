"""The packed network's blocks (utils.export): on a float32 CPU input with the kernel at hand,
each block is three or four kernel calls (utils.deploy.kernel), its float parts done inside them.

They are models.reactnet.BasicBlock's float32 operations in its order (move11 before the 3x3 conv's
sign; the shortcut, move12, PReLU and move13 after it; move21 before the 1x1 convs' sign; their
shortcut, move22, PReLU and move23 after them), so the values are the same as BasicBlock.forward's
on the packed convs: what changes is that no full-size tensor is made for each of them. The convs
are still called as modules, in the same order, so forward hooks (utils.ops) see them.
"""
import torch

from models.reactnet import BasicBlock
from utils.deploy import kernel

__all__ = ["PackedBlock"]


class PackedBlock(BasicBlock):
    """A BasicBlock whose binary convs are utils.export.PackedBinaryConv2d and BatchNorms Identity."""

    def forward(self, x):
        if not kernel.applies(self.binary_3x3, x):
            return super().forward(x)
        x = x.contiguous(memory_format=torch.channels_last)  # a no-op after the first block
        first = kernel.Fused(input_bias=self.move11.bias, residual=self.pooling(x), bias=self.move12.bias,
                             slope=self.prelu1.weight, bias_out=self.move13.bias, next_bias=self.move21.bias)
        out1 = self.binary_3x3(x, first)
        parts = (self.move22.bias, self.prelu2.weight, self.move23.bias)
        if self.inplanes == self.planes:
            bias, slope, bias_out = parts
            return self.binary_pw(out1, kernel.Fused(planes=first.next_planes, residual=out1, bias=bias, slope=slope,
                                                     bias_out=bias_out))
        # The concatenation of the two 1x1 convs' outputs: each writes its half.
        n, _, h, w = out1.shape
        out2 = torch.empty(n, self.planes, h, w, dtype=out1.dtype, memory_format=torch.channels_last)
        halves = zip(out2.chunk(2, 1), *(p.view(-1).chunk(2) for p in parts))
        for conv, (out, bias, slope, bias_out) in zip((self.binary_pw_down1, self.binary_pw_down2), halves):
            conv(out1, kernel.Fused(planes=first.next_planes, residual=out1, bias=bias, slope=slope,
                                    bias_out=bias_out, out=out))
        return out2
