"""The packed network and its blocks (utils.export): on a float32 CPU input with the kernel at hand,
each block is one kernel call (utils.deploy.kernel.block), its float parts done inside it.

They are models.reactnet.BasicBlock's float32 operations in its order (move11 before the 3x3 conv's
sign; the shortcut, move12, PReLU and move13 after it; move21 before the 1x1 convs' sign; their
shortcut, move22, PReLU and move23 after them), so the values are the same as BasicBlock.forward's
on the packed convs: what changes is that no full-size tensor is made for each of them. Where a
forward hook is registered on the block's modules (utils.ops counts operations so), or the sizes
do not fit one call, BasicBlock.forward runs instead, each conv called as a module.

On the CPU the network takes a large batch a few images at a time up to the average pool, so that
each image's activations stay in the caches (oneDNN's stem may round an image's values differently
in another batch size, as it does in the float network); the fc then takes the whole batch. With
the kernel, PyTorch's own operations (the stem, the pool, the fc) run on the calling thread alone
and the kernel on torch.get_num_threads() threads of its pool (kernel.own_threads): PyTorch's
OpenMP threads wait for each other at every operation, many milliseconds each when another
process holds a core.
"""
import torch
import torch.nn.modules.module as module_hooks

from models.reactnet import BasicBlock, ReActNetA
from utils.deploy import kernel

__all__ = ["PackedBlock", "PackedNetwork"]

# Pixels of the input images that go through the convs together: 4 images of 224 x 224.
CHUNK_PIXELS = 4 * 224 * 224


class PackedNetwork(ReActNetA):
    """ReActNetA of PackedBlocks (utils.export.to_packed, load_packed)."""

    def forward(self, x):
        if x.device.type != "cpu":
            return super().forward(x)
        with kernel.own_threads(kernel.applies(self.feature[1].binary_3x3, x)):
            images = max(1, CHUNK_PIXELS // (x.shape[2] * x.shape[3]))
            if len(x) <= images:
                return super().forward(x)
            return self.fc(torch.cat([self.features(part) for part in x.split(images)]))


class PackedBlock(BasicBlock):
    """A BasicBlock whose binary convs are utils.export.PackedBinaryConv2d and BatchNorms Identity."""

    def forward(self, x):
        if kernel.applies(self.binary_3x3, x) and kernel.fits(self, x) and not self._hooked():
            return kernel.block(self, x)
        return super().forward(x)

    def _hooked(self) -> bool:
        """Whether a forward hook would see this block's modules."""
        return bool(module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks) or any(
            m._forward_hooks or m._forward_pre_hooks for m in self._modules.values())
