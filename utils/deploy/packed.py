"""The deployable 1-bit ReActNet-A: export a step-2 checkpoint to bit-packed +-1 weights, and run
it with XOR + popcount, never turning the binary weights back into floats.

A binary conv followed by its BatchNorm computes, per output channel o (eval mode),
    bn(alpha_o * s) = scale_o * s + shift_o,   s = sum over taps of sign(u) * sign(W)
with alpha_o = mean |W_o|, scale_o = alpha_o * gamma_o / sqrt(var_o + eps) and
shift_o = beta_o - mean_o * gamma_o / sqrt(var_o + eps). `s` is an integer, computed exactly
from two bit-planes of the input, "nonzero" (m) and "positive" (p), and the weights' sign bits q:
    s = popcount(m) - 2 * popcount(m & (p xor q)),
so a padded tap (m = 0, the float network pads sign(u) with 0) and an input exactly 0
(sign(0) = 0) contribute 0, as they do in the float network. Everything else of the network
(the real-valued stem and fc, the `move*` biases, PReLU, the shortcuts) is the float network's
own modules, in float. On the CPU, in float32, a C++ kernel (utils/deploy) runs the binary convs
and the blocks' float parts with the same values, several times faster; elsewhere, or without a
C++ compiler, the pure PyTorch forward does. Its command, `python -m utils.export`, is
utils/export.py.

A packed file is a dict read with `torch.load(weights_only=True)` (nothing in it runs when it is
read): {'format': PACKED_FORMAT (utils.checkpoint's), 'version': VERSION, 'arch': 'reactnet_a',
'num_classes', 'input_size' (the training crop size, None where the checkpoint does not say),
'classes' (the class folder names, where the checkpoint has them), 'state_dict'}. Version 1
files, without 'input_size' and 'classes', are read too.
"""
import copy
import os
from collections.abc import Mapping

import torch
import torch.nn as nn

from models import reactnet_a
from models.binary import BinaryConv2d
from models.reactnet import BasicBlock
from utils.checkpoint import (PACKED_FORMAT, atomic_save, checkpoint_step, detect_format, is_packed, load_weights,
                              num_classes, read_checkpoint, trained_input_size)
from utils.deploy import kernel
from utils.deploy.block import PackedBlock, PackedNetwork
from utils.errors import CheckpointError, DataError, first_few

__all__ = [
    "VERSION", "popcount", "bits_to_words", "PackedBinaryConv2d", "to_packed", "build_step2_model", "export",
    "load_packed", "verify",
]

VERSION = 2
WORD = 64  # bits per packed word (int64)
# Each binary conv of a block and the BatchNorm that follows it (models.reactnet.BasicBlock).
CONV_BN = (("binary_3x3", "bn1"), ("binary_pw", "bn2"), ("binary_pw_down1", "bn2_1"),
           ("binary_pw_down2", "bn2_2"))
# int64 elements of the XOR / popcount work tensor per step, by device type: 512 KiB stays in a
# CPU core's cache (measured fastest on this project's CPU); a GPU wants fewer, larger launches.
CHUNK = {"cpu": 1 << 16, "cuda": 1 << 24}

_M1, _M2, _M4, _H01 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F, 0x0101010101010101


def popcount(x: torch.Tensor) -> torch.Tensor:
    """Set bits of each int64 word (SWAR bit tricks; integer arithmetic wraps, so bit 63 counts
    like any other). Works in place on `x`."""
    x.sub_((x >> 1).bitwise_and_(_M1))
    x = (x >> 2).bitwise_and_(_M2).add_(x.bitwise_and_(_M2))
    x.add_(x >> 4).bitwise_and_(_M4)
    return x.mul_(_H01).bitwise_right_shift_(56)  # the bytes' sum lands in the top byte (<= 64)


def bits_to_words(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor [..., n] along its last dim into int64 words [..., ceil(n / 64)]:
    bit i of word j is element 64 j + i; the bits past n are 0. Arithmetic, not a byte view,
    so the words are the same on any byte order."""
    *lead, n = bits.shape
    words = -(-n // WORD)
    bits = bits.to(torch.uint8)
    if n != words * WORD:
        bits = torch.cat([bits, bits.new_zeros(*lead, words * WORD - n)], dim=-1)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    # Bits into bytes (uint8 sums of distinct powers of 2 cannot overflow), then bytes into words.
    octets = (bits.view(*lead, words * 8, 8) << shifts).sum(-1, dtype=torch.uint8)
    return (octets.view(*lead, words, 8).to(torch.int64) << (8 * shifts).to(torch.int64)).sum(-1)


class PackedBinaryConv2d(nn.Module):
    """A binary conv (zero padding k // 2, no bias) and its eval-mode BatchNorm, on packed bits:
    returns scale * s + shift with s the exact integer dot product of sign(input) with sign(W).

    Buffers: `weight_bits` int64 [out, k*k*words] (the sign bits of W, tap by tap, each tap's
    input channels packed into `words` = ceil(in / 64) words), `scale` and `shift` [out], and
    `zero_weights` int64 [z, 2]: (output channel, bit index in its row) of each weight exactly 0.
    sign(0) = 0 in the float network; such a weight is packed as -1 and its contribution taken
    back exactly. A random float32 initialisation has one or two in ReActNet-A (a uniform draw is
    exactly 0 with chance 2**-24), the demo's trained step-2 network one: the list is short.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, device=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, kernel_size // 2
        words = -(-in_channels // WORD)
        self.register_buffer("weight_bits", torch.zeros(out_channels, kernel_size ** 2 * words,
                                                        dtype=torch.int64, device=device))
        self.register_buffer("scale", torch.zeros(out_channels, device=device))
        self.register_buffer("shift", torch.zeros(out_channels, device=device))
        self.register_buffer("zero_weights", torch.zeros(0, 2, dtype=torch.int64, device=device))

    @classmethod
    def like(cls, conv: BinaryConv2d) -> "PackedBinaryConv2d":
        """An empty packed conv of `conv`'s shape, on its device."""
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.weight.device)

    @classmethod
    def fold(cls, conv: BinaryConv2d, bn: nn.BatchNorm2d) -> "PackedBinaryConv2d":
        """Pack sign(conv.weight) and fold alpha and `bn` (its running statistics) into scale and
        shift."""
        weight = conv.weight.detach()
        packed = cls.like(conv)
        signs = weight.permute(0, 2, 3, 1)  # [out, k, k, in]: the packing order
        packed.weight_bits.copy_(bits_to_words(signs > 0).flatten(1))
        words = packed.weight_bits.shape[1] // conv.kernel_size[0] ** 2
        zero = (signs == 0).nonzero()  # (o, dy, dx, c) -> bit (dy * k + dx) * words * 64 + c of row o
        packed.zero_weights = torch.stack(
            [zero[:, 0], ((zero[:, 1] * conv.kernel_size[0] + zero[:, 2]) * words * WORD + zero[:, 3])], dim=1)
        # float64, then one rounding to the stored float32: the only error the fold adds. float32
        # is what the rest of the network computes in, and half the size.
        alpha = weight.double().abs().mean(dim=(1, 2, 3))
        inv_std = bn.weight.detach().double() / (bn.running_var.double() + bn.eps).sqrt()
        packed.scale.copy_(alpha * inv_std)
        packed.shift.copy_(bn.bias.detach().double() - bn.running_mean.double() * inv_std)
        return packed

    def float_parameters(self) -> int:
        """Parameters of the binary conv and BatchNorm this layer stands for: W, gamma and beta."""
        return self.weight_bits.shape[0] * (self.in_channels * self.kernel_size ** 2 + 2)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if kernel.applies(self, u):  # the C++ kernel: the same values, several times faster
            return kernel.binary_conv(self, u)
        n, _, h, w = u.shape
        k, stride, pad = self.kernel_size, self.stride, self.padding
        h_out, w_out = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        u = u.permute(0, 2, 3, 1)  # channels last: a pixel's channels are packed together
        planes = []
        for bits in (u != 0, u > 0):  # m, p: [n, h, w, words]
            words = bits_to_words(bits)
            if pad:  # padded taps have m = 0: they contribute 0, as the float network's zero padding
                words = nn.functional.pad(words, (0, 0, pad, pad, pad, pad))
            # im2col on the packed words: [n * h_out * w_out, k*k*words], taps in weight_bits' order
            taps = [words[:, dy:dy + stride * (h_out - 1) + 1:stride, dx:dx + stride * (w_out - 1) + 1:stride]
                    for dy in range(k) for dx in range(k)]
            planes.append(torch.stack(taps, dim=3).reshape(n * h_out * w_out, -1))
        nonzero, positive = planes
        correction = self._zero_weight_correction(nonzero, positive) if len(self.zero_weights) else 0
        # s = (taps where sign(u) = sign(W)) - (taps where they differ) over the nonzero taps
        mismatches = nonzero.new_empty(nonzero.shape[0], self.out_channels)
        rows = max(1, CHUNK.get(u.device.type, CHUNK["cuda"]) // self.weight_bits.numel())
        for start in range(0, nonzero.shape[0], rows):
            end = start + rows
            differ = (positive[start:end, None] ^ self.weight_bits).bitwise_and_(nonzero[start:end, None])
            mismatches[start:end] = popcount(differ).sum(-1)
        s = popcount(nonzero).sum(-1, keepdim=True) - 2 * mismatches + correction
        out = torch.addcmul(self.shift, s.to(self.scale.dtype), self.scale)
        return out.view(n, h_out, w_out, -1).permute(0, 3, 1, 2)

    def _zero_weight_correction(self, nonzero, positive):
        """[pixels, out]: what the weights exactly 0, packed as -1, took from s: + sign(input)."""
        out_channel, bit = self.zero_weights.unbind(1)
        word, shift = bit // WORD, bit % WORD
        m, p = ((plane[:, word] >> shift) & 1 for plane in (nonzero, positive))
        correction = nonzero.new_zeros(nonzero.shape[0], self.out_channels)
        return correction.index_add_(1, out_channel, m * (2 * p - 1))

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


def _swap(model: nn.Module, make) -> nn.Module:
    """Replace each block's binary conv by `make(block, conv name, bn name)` and its BatchNorm by
    Identity: the block's forward then runs the packed conv in their place (PackedBlock: the same
    modules and names, its float parts fused into the kernel's calls where it runs), and the
    network a PackedNetwork."""
    model.__class__ = PackedNetwork
    for block in model.modules():
        if isinstance(block, BasicBlock):
            block.__class__ = PackedBlock
            for conv_name, bn_name in CONV_BN:
                if hasattr(block, conv_name):
                    setattr(block, conv_name, make(block, conv_name, bn_name))
                    setattr(block, bn_name, nn.Identity())
    return model


def to_packed(model: nn.Module) -> nn.Module:
    """Turn a step-2 ReActNet-A (binary weights), in place, into its packed form, in eval mode."""
    if not model.binary_weights:
        raise ValueError("a step-1 network has real-valued block weights: nothing to binarize")
    return _swap(model.eval(), lambda block, conv_name, bn_name: PackedBinaryConv2d.fold(
        getattr(block, conv_name), getattr(block, bn_name)))


def _skeleton(num_classes: int, device) -> nn.Module:
    """The packed network's modules, uninitialised, on `device`."""
    with torch.device("meta"):
        model = _swap(reactnet_a(binary_weights=True, num_classes=num_classes),
                      lambda block, conv_name, _: PackedBinaryConv2d.like(getattr(block, conv_name)))
    return model.to_empty(device=device or "cpu").eval()


def build_step2_model(checkpoint) -> nn.Module:
    """The float step-2 ReActNet-A of a checkpoint in any layout `load_weights` reads, in eval
    mode; a step-1 checkpoint or a packed file is refused (CheckpointError naming the file)."""
    return _step2_model_and_training(checkpoint)[0]


def _step2_model_and_training(checkpoint) -> tuple:
    """(the float step-2 model, what the checkpoint says of its training: input size and classes)."""
    obj = read_checkpoint(checkpoint)
    if is_packed(obj):
        raise CheckpointError(f"{checkpoint!r} is a packed 1-bit file, not a float checkpoint")
    if checkpoint_step(obj) == 1:
        raise CheckpointError(
            f"{checkpoint!r} is a step-1 checkpoint: its block convs have real-valued weights (only the "
            "activations are binary), so it has no 1-bit form; train step 2 from it and export that")
    model = reactnet_a(binary_weights=True, num_classes=num_classes(detect_format(obj)[1], repr(checkpoint)))
    load_weights(model, obj)
    return model.eval(), {"input_size": trained_input_size(obj), "classes": obj.get("classes")}


def check_out(checkpoint, out) -> None:
    """Refuse, before any work, an `out` that would overwrite the checkpoint or cannot be written."""
    out = os.fspath(out)
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out) or out.endswith(os.sep):
        raise CheckpointError(f"--out {out} names a folder: give the packed file's path, e.g. "
                              f"{os.path.join(out, 'reactnet_a_1bit.pt')}")
    if not os.path.isdir(folder):
        raise CheckpointError(f"--out {out}: the folder {folder} does not exist")
    if os.path.exists(out) and os.path.exists(checkpoint) and os.path.samefile(checkpoint, out):
        raise CheckpointError(f"--out {out} is the checkpoint itself: writing it would replace the float "
                              "weights; give another path")


def export(checkpoint, out) -> dict:
    """Write the packed form of a step-2 checkpoint (any layout `load_weights` reads) to `out`,
    atomically; returns the packed object. CheckpointError naming the file when it cannot."""
    check_out(checkpoint, out)
    model, trained = _step2_model_and_training(checkpoint)
    model = to_packed(model)
    packed = {"format": PACKED_FORMAT, "version": VERSION, "arch": "reactnet_a",
              "num_classes": model.fc.out_features, **trained, "state_dict": model.state_dict()}
    atomic_save(packed, out)
    return packed


def load_packed(source, device=None, name=None) -> nn.Module:
    """The eval-mode packed network of a file written by `export` (a path, or what
    `read_checkpoint` returned, then named `name` in errors), on `device` (default CPU).
    CheckpointError naming the file for anything else: a float checkpoint, a format version this
    code does not know, a corrupt or truncated file, entries that do not fit."""
    path = name or (source if isinstance(source, (str, os.PathLike)) else "the packed file")
    obj = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    if not is_packed(obj):
        try:
            fmt = f"a float checkpoint ({detect_format(obj)[0]} layout)"
        except CheckpointError:
            fmt = "not a packed 1-bit file"
        raise CheckpointError(f"{path!r} is {fmt}, not a packed 1-bit file: make one with "
                              "python -m utils.export --checkpoint CKPT --out FILE")
    version = obj.get("version")
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{path!r} is a damaged packed file: its format version is {version!r}")
    if version > VERSION:
        raise CheckpointError(f"{path!r} is packed format version {version}, written by a newer version of "
                              f"this code, which reads versions 1 to {VERSION}: update the repository")
    num_classes, state_dict = obj.get("num_classes"), obj.get("state_dict")
    if type(num_classes) is not int or num_classes < 1 or not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{path!r} is a damaged packed file: no valid num_classes or state_dict")
    model = _skeleton(num_classes, device)
    problems = []
    for name, conv in model.named_modules():
        zeros = state_dict.get(f"{name}.zero_weights")
        if isinstance(conv, PackedBinaryConv2d) and isinstance(zeros, torch.Tensor) and zeros.dim() == 2:
            conv.zero_weights = conv.zero_weights.new_empty(zeros.shape[0], 2)  # the one varying length
            limits = torch.tensor([conv.out_channels, conv.weight_bits.shape[1] * WORD])
            if zeros.numel() and zeros.shape[1] == 2 and not ((zeros >= 0) & (zeros < limits)).all():
                problems.append(f"{name}.zero_weights (indices out of range)")
    target = model.state_dict()
    problems += sorted(set(target) ^ set(state_dict)) + [
        f"{k} {_describe(v)} (expected {_describe(target[k])})" for k, v in state_dict.items()
        if k in target and _describe(v) != _describe(target[k])]
    if problems:
        raise CheckpointError(f"{path!r} is a damaged packed file: entries that do not fit: "
                              f"{first_few(problems, 3)}")
    model.load_state_dict(state_dict, strict=True)
    if torch.device(device or "cpu").type == "cpu":
        kernel.library()  # built (or found in the cache) now, or the fallback said, not at the first forward
    return model


def _describe(v) -> str:
    return f"{v.dtype} {list(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__


def _relative_error(actual, expected) -> torch.Tensor:
    """Per image, the largest logit difference relative to the largest |logit| of `expected`."""
    return (actual - expected).abs().amax(1) / expected.abs().amax(1)


def verify(checkpoint, packed_file, data, input_size: int, batch_size: int = 64) -> dict:
    """The float step-2 model of `checkpoint` (float32, and float64 as the reference) and the
    packed model of `packed_file` on data/val: max relative logit errors (packed vs float32,
    packed vs float64, float32 vs float64), images whose top-1 class differs between packed and
    float32, and both accuracies."""
    from utils.data import to_device, val_loader
    model = build_step2_model(checkpoint)
    reference = copy.deepcopy(model).double()
    packed = load_packed(packed_file)
    worst = {"packed_vs_float32": 0.0, "packed_vs_float64": 0.0, "float32_vs_float64": 0.0}
    differ, correct, count = 0, [0, 0], 0
    with torch.no_grad():
        for raw in val_loader(data, batch_size, 0, input_size=input_size):
            batch = to_device(raw, "cpu")
            if batch.bad:
                raise DataError(f"validation image {batch.bad[0][0]} is unreadable ({batch.bad[0][1]})")
            images, target = batch.images, batch.target
            logits, packed_logits, exact = model(images), packed(images), reference(images.double())
            for key, actual, expected in (("packed_vs_float32", packed_logits, logits),
                                          ("packed_vs_float64", packed_logits.double(), exact),
                                          ("float32_vs_float64", logits.double(), exact)):
                worst[key] = max(worst[key], _relative_error(actual, expected).max().item())
            differ += int((logits.argmax(1) != packed_logits.argmax(1)).sum())
            for i, out in enumerate((logits, packed_logits)):
                correct[i] += int((out.argmax(1) == target).sum())
            count += len(target)
    return {"images": count, **worst, "top1_differ": differ,
            "float_top1": 100 * correct[0] / count, "packed_top1": 100 * correct[1] / count}
