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
    "approx_sign_grad", "ApproxSign", "BinaryWeight", "SignConv2d", "RPReLUFunction",
    "LearnableBias", "BinaryConv2d", "rprelu",
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
        return alpha * torch.sign(weight)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        return grad_out * (weight.abs() <= 1).to(grad_out.dtype)


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
        grad_u = grad_sign.to(u.dtype) * approx_sign_grad(u) if grad_sign is not None else None
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return grad_u, grad_weight, None, None


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


class RPReLUFunction(torch.autograd.Function):
    """RPReLU: prelu(x + bias_in, slope) + bias_out, saving only x + bias_in."""

    @staticmethod
    def forward(ctx, x, bias_in, slope, bias_out):
        z = x + bias_in
        ctx.save_for_backward(z, slope)
        return torch.where(z > 0, z, z * slope.view(1, -1, 1, 1)) + bias_out

    @staticmethod
    def backward(ctx, grad_out):
        z, slope = ctx.saved_tensors
        positive = z > 0
        grad_z = torch.where(positive, grad_out, grad_out * slope.view(1, -1, 1, 1).to(grad_out.dtype))
        grad_slope = torch.where(positive, 0, grad_out * z).sum(dim=(0, 2, 3))
        grad_bias_in = grad_z.sum(dim=(0, 2, 3)).view(1, -1, 1, 1)
        grad_bias_out = grad_out.sum(dim=(0, 2, 3)).view(1, -1, 1, 1)
        return grad_z, grad_bias_in, grad_slope.to(slope.dtype), grad_bias_out


def rprelu(x, bias_in: torch.Tensor, slope: torch.Tensor, bias_out: torch.Tensor) -> torch.Tensor:
    return RPReLUFunction.apply(x, bias_in, slope, bias_out)


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
