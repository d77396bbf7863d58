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

    def features(self, x):
        """ReActNetA.features. On the CPU the stem computes channels-last memory on every path (the
        kernel's layout; oneDNN's values), and where the kernel runs every block they are one call."""
        if x.device.type != "cpu":
            return super().features(x)
        stem, *blocks = self.feature
        x = stem(x.contiguous(memory_format=torch.channels_last))
        if _fused(blocks, x) and not _hooked(blocks):  # the blocks' forward is not called
            x = kernel.blocks(self, blocks, x)
        else:
            for b in blocks:
                x = b(x)
        return torch.flatten(self.pool1(x), 1)


class PackedBlock(BasicBlock):
    """A BasicBlock whose binary convs are utils.export.PackedBinaryConv2d and BatchNorms Identity."""

    def forward(self, x):
        if _fused([self], x):
            return kernel.block(self, x)
        return super().forward(x)


def _hooked(modules) -> bool:
    """Whether a forward hook would see one of `modules` (utils.ops counts operations so)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _fused(blocks, x) -> bool:
    """Whether the kernel runs PackedBlocks `blocks` in turn from `x`, each in one call: each `applies`
    and `fits`, and no forward hook would see their modules (BasicBlock.forward calls each)."""
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return False
    h, w = x.shape[2:]
    for b in blocks:
        modules = b._modules  # not b.binary_3x3: nn.Module.__getattr__ is slow
        if not (kernel.applies(modules["binary_3x3"], x) and kernel.fits(b, h, w)) or _hooked(modules.values()):
            return False
        h, w = (h - 1) // b.stride + 1, (w - 1) // b.stride + 1
    return True
