"""The binarizers against the original release's formulas (README, "The original release") and against the original code's autograd arithmetic."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.binary import (ApproxSign, BinaryConv2d, BinaryWeight, LearnableBias, rprelu,
                           SignConv2d, approx_sign_grad)

EDGES = torch.tensor([-2.0, -1.5, -1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0],
                     dtype=torch.float64)


def original_binary_activation(x):
    """The original BinaryActivation: sign forward, gradient of a piecewise quadratic backward."""
    mask1, mask2, mask3 = (x < -1).to(x.dtype), (x < 0).to(x.dtype), (x < 1).to(x.dtype)
    out1 = -1 * mask1 + (x * x + 2 * x) * (1 - mask1)
    out2 = out1 * mask2 + (-x * x + 2 * x) * (1 - mask2)
    out3 = out2 * mask3 + 1 * (1 - mask3)
    return torch.sign(x).detach() - out3.detach() + out3


def original_binary_weight(w):
    """The original step-2 HardBinaryConv weight: alpha * sign(W) forward, clamp(W, -1, 1) backward."""
    alpha = w.abs().mean(dim=3, keepdim=True).mean(dim=2, keepdim=True).mean(dim=1, keepdim=True).detach()
    clipped = clamp_as_pytorch_1_7(w)
    return (alpha * torch.sign(w)).detach() - clipped.detach() + clipped


def clamp_as_pytorch_1_7(w):
    """torch.clamp(w, -1.0, 1.0) as the authors' PyTorch 1.7 differentiates it: subgradient 1 at the
    bounds, where the PyTorch 2.14 used here gives 0 (tensor bounds: 0.5)."""
    return torch.where(w.abs() <= 1, w, w.detach().clamp(-1.0, 1.0))


def formula_approx_sign_grad(x):
    """The original release (README): 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere."""
    return torch.where((x >= -1) & (x < 0), 2 + 2 * x, torch.where((x >= 0) & (x < 1), 2 - 2 * x, 0.0))


def test_approx_sign_forward_and_backward_at_edges():
    x = EDGES.clone().requires_grad_()
    y = ApproxSign.apply(x)
    y.backward(torch.ones_like(y))
    assert torch.equal(y, torch.sign(EDGES)) and y[EDGES == 0].item() == 0  # sign(0) = 0
    assert torch.equal(x.grad, formula_approx_sign_grad(EDGES))
    assert torch.equal(approx_sign_grad(EDGES), formula_approx_sign_grad(EDGES))
    assert x.grad[EDGES.abs() == 1].eq(0).all() and x.grad[EDGES == 0].item() == 2


def test_approx_sign_matches_original_code():
    x = torch.cat([EDGES, torch.randn(1000, dtype=torch.float64) * 1.5])
    g = torch.randn_like(x)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    ApproxSign.apply(ours).backward(g)
    original_binary_activation(ref).backward(g)
    assert torch.equal(ApproxSign.apply(x), original_binary_activation(x))
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-15, atol=1e-15)


def test_binary_weight_forward_and_backward_at_edges():
    w = torch.tensor([[-2.0, -1.0, -0.5, 0.0], [0.5, 1.0, 1.5, 0.25]], dtype=torch.float64).view(2, 2, 2, 1)
    w.requires_grad_()
    y = BinaryWeight.apply(w)
    y.backward(torch.ones_like(y))
    alpha = torch.tensor([3.5 / 4, 3.25 / 4], dtype=torch.float64).view(2, 1, 1, 1)  # mean |W| per output
    assert torch.equal(y, alpha * torch.sign(w.detach()))
    # Straight through clamp(W, -1, 1): passes for |W| <= 1 (including |W| = 1), zero for |W| > 1.
    assert torch.equal(w.grad, (w.detach().abs() <= 1).to(w.dtype))
    assert w.grad.view(-1).tolist() == [0, 1, 1, 1, 1, 1, 0, 1]


def test_binary_weight_matches_original_code():
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64) * 0.8
    w.view(-1)[:4] = torch.tensor([1.0, -1.0, 0.0, 1.2])
    g = torch.randn_like(w)
    ours, ref = w.clone().requires_grad_(), w.clone().requires_grad_()
    y_ours, y_ref = BinaryWeight.apply(ours), original_binary_weight(ref)
    y_ours.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-15, atol=1e-15)
    assert torch.equal(ours.grad, ref.grad)


def test_binary_weight_gives_no_gradient_through_alpha():
    # If alpha were differentiated, the gradient would depend on how the other weights' grads sum up.
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.zeros(3, 2, 3, 3, dtype=torch.float64)
    g[0, 0, 0, 0] = 1
    BinaryWeight.apply(w).backward(g)
    assert w.grad.count_nonzero() == (1 if w[0, 0, 0, 0].abs() <= 1 else 0)


@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 1)])
def test_sign_conv_matches_plain_autograd(kernel, stride):
    torch.manual_seed(0)
    u = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    u.view(-1)[:3] = torch.tensor([0.0, 1.0, -1.0])
    w = torch.randn(5, 4, kernel, kernel, dtype=torch.float64)
    g = torch.randn(2, 5, 8 // stride, 8 // stride, dtype=torch.float64)
    pad = kernel // 2
    u1, w1, u2, w2 = (t.clone().requires_grad_() for t in (u, w, u, w))
    y1 = SignConv2d.apply(u1, w1, stride, pad)
    y2 = F.conv2d(original_binary_activation(u2), w2, None, stride, pad)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u1.grad, u2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-12, atol=1e-12)


def test_sign_conv_weight_gradcheck():
    # The output is linear in the weight, so finite differences check it; sign(u) has no
    # useful finite-difference gradient (the ApproxSign gradient is checked above).
    torch.manual_seed(0)
    u = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: SignConv2d.apply(u, w, 2, 1), (w,))


@pytest.mark.parametrize("binary_weights", [False, True])
def test_binary_conv2d_matches_original_code(binary_weights):
    torch.manual_seed(0)
    conv = BinaryConv2d(4, 6, 3, stride=2, binary_weights=binary_weights).double()
    with torch.no_grad():
        conv.weight.mul_(10)  # some |W| > 1
        conv.weight.view(-1)[0] = 1.0
    assert (conv.weight.abs() > 1).any()
    u = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    g = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    u1, u2 = u.clone().requires_grad_(), u.clone().requires_grad_()
    w2 = conv.weight.detach().clone().requires_grad_()
    y1 = conv(u1)
    y2 = F.conv2d(original_binary_activation(u2), original_binary_weight(w2) if binary_weights else w2,
                  None, 2, 1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u1.grad, u2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv.weight.grad, w2.grad, rtol=1e-12, atol=1e-12)
    assert conv.bias is None and conv.padding == (1, 1)


def test_rprelu_matches_plain_autograd():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    b_in, b_out = torch.randn(1, 3, 1, 1, dtype=torch.float64), torch.randn(1, 3, 1, 1, dtype=torch.float64)
    slope = torch.full((3,), 0.25, dtype=torch.float64)
    x[0, 0, 0, :2] = -b_in[0, 0, 0, 0]  # z = x + bias_in exactly 0: the kink
    g = torch.randn_like(x)
    ours = [t.clone().requires_grad_() for t in (x, b_in, slope, b_out)]
    ref = [t.clone().requires_grad_() for t in (x, b_in, slope, b_out)]
    y1 = rprelu(*ours)
    y2 = F.prelu(ref[0] + ref[1], ref[2]) + ref[3]  # the original: move12 -> prelu1 -> move13
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(y1, y2, rtol=1e-14, atol=1e-14)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-14, atol=1e-14)


def test_rprelu_gradcheck():
    torch.manual_seed(0)
    inputs = (torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(1, 3, 1, 1, dtype=torch.float64),
              torch.rand(3, dtype=torch.float64), torch.randn(1, 3, 1, 1, dtype=torch.float64))
    assert torch.autograd.gradcheck(rprelu, tuple(t.requires_grad_() for t in inputs))


def test_learnable_bias_starts_at_zero():
    layer = LearnableBias(5)
    assert layer.bias.shape == (1, 5, 1, 1) and not layer.bias.any()
    x = torch.randn(2, 5, 3, 3)
    assert torch.equal(layer(x), x)


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while running fn()."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_sign_conv_saves_only_input_and_weight():
    u = torch.randn(8, 32, 16, 16, requires_grad=True)
    conv = nn.Conv2d(32, 32, 3, padding=1, bias=False)
    fused = saved_bytes(lambda: SignConv2d.apply(u, conv.weight, 1, 1))
    assert fused == u.numel() * 4 + conv.weight.numel() * 4
    naive = saved_bytes(lambda: F.conv2d(original_binary_activation(u), conv.weight, None, 1, 1))
    assert naive >= 3 * fused
