"""The binarizers of ReActNet-A, written as autograd Functions that save only what backward needs.

The original code builds the ApproxSign gradient out of elementwise mask arithmetic, which keeps
six full-size temporaries alive per binary activation, and keeps the sign output alive for the
convolution's weight gradient on top. Here a binary activation followed by its convolution is one
Function (`SignConv2d`) that saves only the pre-sign input and recomputes the sign in backward;
the values and gradients are those of the original (see tests/test_binary.py).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "approx_sign_grad", "ApproxSign", "BinaryWeight", "SignConv2d",
    "PReLUBiasFunction", "LearnableBias", "BinaryConv2d", "rprelu", "prelu_bias",
]


def approx_sign_grad(x: torch.Tensor) -> torch.Tensor:
    """Derivative of Bi-Real Net's ApproxSign: 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere."""
    return (2 - 2 * x.abs()).clamp_(min=0)


class ApproxSign(torch.autograd.Function):
    """sign(x) forward (sign(0) = 0); ApproxSign gradient backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return grad_out * approx_sign_grad(x)


class BinaryWeight(torch.autograd.Function):
    """alpha * sign(W), alpha = per-output-channel mean |W| treated as a constant;
    the gradient passes straight through clamp(W, -1, 1): it is zero where |W| > 1."""

    @staticmethod
    def forward(ctx, weight):
        ctx.save_for_backward(weight)
        alpha = weight.abs().mean(dim=tuple(range(1, weight.dim())), keepdim=True)
        return torch.sign(weight).mul_(alpha)  # = alpha * sign(W), one temporary fewer

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        if weight.dtype != grad_out.dtype:
            return grad_out * (weight.abs() <= 1).to(grad_out.dtype)
        # The same product, grad * (|W| <= 1 as 1.0 / 0.0), in one buffer.
        return weight.abs().le_(1).mul_(grad_out)


class SignConv2d(torch.autograd.Function):
    """conv2d(sign(u), weight) with the ApproxSign gradient for u.

    Saves u and the weight (a parameter, or the small binarized copy of it) and recomputes sign(u)
    in backward, instead of saving the full-size sign output next to u. Under autocast the
    convolution runs in the autocast dtype, as F.conv2d would; gradients come back in the dtypes
    of u and weight.
    """

    @staticmethod
    def forward(ctx, u, weight, stride, padding):
        out = F.conv2d(torch.sign(u), weight, None, stride, padding)
        ctx.save_for_backward(u, weight)
        ctx.conv_args = (stride, padding)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        u, weight = ctx.saved_tensors
        stride, padding = ctx.conv_args
        dtype = grad_out.dtype
        grad_sign, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_out, torch.sign(u).to(dtype), weight.to(dtype), None,
            _pair(stride), _pair(padding), [1, 1], False, [0, 0], 1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
        )
        grad_u = None
        if grad_sign is not None:
            # grad_sign * approx_sign_grad(u), with one temporary instead of four:
            # (-2|u| + 2) equals (2 - 2|u|) exactly (2|u| and its negation are exact).
            grad_u = u.abs().mul_(-2).add_(2).clamp_(min=0).mul_(grad_sign.to(u.dtype))
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return grad_u, grad_weight, None, None


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def _prelu_forward(z, slope):
    """prelu(z) = z where z > 0 else slope * z, in the dtype torch.where(z > 0, z, z * slope) has."""
    if z.dtype == slope.dtype and not torch.onnx.is_in_onnx_export():
        # One pass, the same values as the torch.where form. (The kernel, not torch.prelu, which
        # autocast would run in bfloat16; the TorchScript ONNX exporter knows only the where form.)
        return torch.ops.aten._prelu_kernel(z, slope.view(1, -1, 1, 1))
    return torch.where(z > 0, z, z * slope.view(1, -1, 1, 1))


def _prelu_backward(grad_out, z, slope):
    """(grad of z, per-channel grad of slope) of prelu, as
    where(z > 0, g, g * slope) and sum over (N, H, W) of where(z > 0, 0, g * z)."""
    if grad_out.dtype == z.dtype == slope.dtype:
        grad_z, grad_slope = torch.ops.aten._prelu_kernel_backward(grad_out, z, slope.view(1, -1, 1, 1))
        return grad_z, grad_slope.sum(dim=(0, 2, 3))
    positive = z > 0
    grad_z = torch.where(positive, grad_out, grad_out * slope.view(1, -1, 1, 1).to(grad_out.dtype))
    grad_slope = torch.where(positive, 0, grad_out * z).sum(dim=(0, 2, 3))
    return grad_z, grad_slope.to(slope.dtype)


def _iadd(y, other):
    """y + other, written into y (a fresh intermediate nothing else needs; `other` of y's shape or
    a per-channel [1, C, 1, 1] bias) when that keeps the dtype of the sum; under autocast a
    bfloat16 y plus a float32 tensor is float32, and is then computed out of place."""
    if y.dtype == torch.promote_types(y.dtype, other.dtype):
        return y.add_(other)
    return y + other


class PReLUBiasFunction(torch.autograd.Function):
    """prelu(z, slope) + bias_out, saving only z. RPReLU is prelu(x + bias_in) + bias_out: the caller
    adds bias_in (`rprelu`, or in place as models.reactnet.BasicBlock does)."""

    @staticmethod
    def forward(ctx, z, slope, bias_out):
        ctx.save_for_backward(z, slope)
        return _iadd(_prelu_forward(z, slope), bias_out)

    @staticmethod
    def backward(ctx, grad_out):
        z, slope = ctx.saved_tensors
        grad_z, grad_slope = _prelu_backward(grad_out, z, slope)
        return grad_z, grad_slope, grad_out.sum(dim=(0, 2, 3)).view(1, -1, 1, 1)


def rprelu(x, bias_in: torch.Tensor, slope: torch.Tensor, bias_out: torch.Tensor) -> torch.Tensor:
    """RPReLU: prelu(x + bias_in, slope) + bias_out."""
    return PReLUBiasFunction.apply(x + bias_in, slope, bias_out)


def prelu_bias(z, slope: torch.Tensor, bias_out: torch.Tensor) -> torch.Tensor:
    return PReLUBiasFunction.apply(z, slope, bias_out)


class LearnableBias(nn.Module):
    """A learnable per-channel shift, `bias` of shape [1, C, 1, 1], initialised to 0
    (the `move*` layers of the released checkpoints)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        return x + self.bias


class BinaryConv2d(nn.Conv2d):
    """A bias-free convolution of sign(input), the ApproxSign gradient flowing to the input.

    `binary_weights=False` (step 1) convolves with the real-valued `weight`;
    `binary_weights=True` (step 2) with `BinaryWeight(weight)`. Both steps store the same
    parameter, so a step-1 state_dict loads into a step-2 model.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, binary_weights=True):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=kernel_size // 2, bias=False)
        self.binary_weights = binary_weights

    def effective_weight(self) -> torch.Tensor:
        return BinaryWeight.apply(self.weight) if self.binary_weights else self.weight

    def forward(self, u):
        return SignConv2d.apply(u, self.effective_weight(), self.stride, self.padding)

    def extra_repr(self):
        return super().extra_repr() + f", binary_weights={self.binary_weights}"
