"""The packed network's blocks (utils.export): on a float32 CPU input with the kernel at hand, each
block is one kernel call (utils.deploy.kernel.block), its float parts done inside it.

They are models.reactnet.BasicBlock's float32 operations in its order (move11 before the 3x3 conv's
sign; the shortcut, move12, PReLU and move13 after it; move21 before the 1x1 convs' sign; their
shortcut, move22, PReLU and move23 after them), so the values are the same as BasicBlock.forward's
on the packed convs: what changes is that no full-size tensor is made for each of them. Where a
forward hook is registered on the block's modules (utils.ops counts operations so), or the sizes
do not fit one call, BasicBlock.forward runs instead, each conv called as a module.
"""
import torch.nn.modules.module as module_hooks

from models.reactnet import BasicBlock
from utils.deploy import kernel

__all__ = ["PackedBlock"]


class PackedBlock(BasicBlock):
    """A BasicBlock whose binary convs are utils.export.PackedBinaryConv2d and BatchNorms Identity."""

    def forward(self, x):
        if kernel.applies(self.binary_3x3, x) and kernel.fits(self, x) and not self._hooked():
            return kernel.block(self, x)
        return super().forward(x)

    def _hooked(self) -> bool:
        """Whether a forward hook would see this block's modules."""
        return bool(module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks) or any(
            m._forward_hooks or m._forward_pre_hooks for m in self.children())
