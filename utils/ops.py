"""Count BOPs, FLOPs and OPs the way the ReActNet / AdamBNN papers do, on a real forward pass.

Convention (the authors' answers, ReActNet issues 19 and 23): multiply-accumulates per image,
Cin*Cout*Hout*Wout*k*k/groups for a conv and in*out for a linear layer; BN, PReLU, biases and
pooling are not counted. A conv with binary weights and binary inputs (`BinaryConv2d` with
`binary_weights=True`, step 2) counts as BOPs; every other conv and linear layer counts as FLOPs;
OPs = FLOPs + BOPs / 64.

Step 1's block convs take binary inputs but have real weights, so they are not XNOR-popcount
operations: they count as FLOPs here (the papers give no OPs for step 1). Counted as BOPs they
would give exactly the step-2 numbers.

    python -m utils.ops [--input-size 224]
"""
import argparse

import torch
import torch.nn as nn

from models import reactnet_a
from models.binary import BinaryConv2d

__all__ = ["count_ops"]


def count_ops(model: nn.Module, input_size=(1, 3, 224, 224)) -> dict:
    """Return {'bops', 'flops', 'ops', 'params'} of `model` for one image of `input_size`[1:]."""
    counts = {"bops": 0, "flops": 0}

    def hook(module, inputs, output):
        per_image = output[0].numel()  # Cout*Hout*Wout for a conv, out for a linear layer
        if isinstance(module, nn.Conv2d):
            k_h, k_w = module.kernel_size
            macs = per_image * module.in_channels // module.groups * k_h * k_w
        else:
            macs = per_image * module.in_features
        binary = isinstance(module, BinaryConv2d) and module.binary_weights
        counts["bops" if binary else "flops"] += macs

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_size, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    return {**counts, "ops": counts["flops"] + counts["bops"] // 64, "params": params}


def main(argv=None):
    parser = argparse.ArgumentParser(description="BOPs, FLOPs and OPs of ReActNet-A, step 1 and step 2.")
    parser.add_argument("--input-size", type=int, default=224, help="image side in pixels, a multiple of 32")
    args = parser.parse_args(argv)
    side = args.input_size
    rows = [(step, count_ops(reactnet_a(binary_weights=step == 2), (1, 3, side, side))) for step in (1, 2)]

    print(f"ReActNet-A, {side}x{side}, per image; multiply-accumulates; OPs = FLOPs + BOPs/64")
    print(f"{'step':<6}{'BOPs':>16}{'FLOPs':>16}{'OPs':>16}{'params':>13}")
    for step, c in rows:
        print(f"{step:<6}{c['bops']:>16,}{c['flops']:>16,}{c['ops']:>16,}{c['params']:>13,}")
    print("papers' notation:")
    for step, c in rows:
        print(f"{step:<6}{c['bops'] / 1e9:>15.2f}e9{c['flops'] / 1e8:>14.2f}e8{c['ops'] / 1e8:>14.2f}e8"
              f"{c['params'] / 1e6:>12.2f}M")
    print("step 1: block convs have binary inputs but real weights, counted as FLOPs;\n"
          "step 2: block convs have binary inputs and weights, counted as BOPs.")


if __name__ == "__main__":
    main()
