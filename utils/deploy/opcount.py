"""Count BOPs, FLOPs and OPs the way the ReActNet / AdamBNN papers do, on a real forward pass.

Convention (the authors' answers, ReActNet issues #19 and #23): multiply-accumulates per image,
Cin*Cout*Hout*Wout*k*k/groups for a conv and in*out for a linear layer; BN, PReLU, biases and
pooling are not counted. A conv with binary weights and binary inputs (`BinaryConv2d` with
`binary_weights=True`, step 2) counts as BOPs; every other conv and linear layer counts as FLOPs;
OPs = FLOPs + BOPs / 64.

Step 1's block convs take binary inputs but have real weights, so they are not XNOR-popcount
operations: they count as FLOPs here (the papers give no OPs for step 1). Counted as BOPs they
would give exactly the step-2 numbers.

`summary` lists the step-2 network layer by layer, like Larq's `lq.models.summary`: binary or
float, parameters, bits per weight, bytes in the packed 1-bit file (utils/deploy/packed.py), BOPs
and FLOPs, and the float vs packed model size. Its command, `python -m utils.ops`, is
utils/ops.py.
"""
import copy

import torch
import torch.nn as nn

from models.binary import BinaryConv2d
from utils.deploy.packed import PackedBinaryConv2d, to_packed

__all__ = ["layer_ops", "count_ops", "summary"]


def _binary(module) -> bool:
    """A conv of binary inputs and binary weights: XNOR-popcount, counted as BOPs."""
    return isinstance(module, PackedBinaryConv2d) or (isinstance(module, BinaryConv2d) and module.binary_weights)


def layer_ops(model: nn.Module, input_size=(1, 3, 224, 224)) -> dict:
    """{layer name: ('bops' or 'flops', multiply-accumulates)} of each conv and linear layer of
    `model` for one image of `input_size`[1:], in the order they run."""
    layers = {}

    def hook(module, inputs, output):
        per_image = output[0].numel()  # Cout*Hout*Wout for a conv, out for a linear layer
        if isinstance(module, nn.Conv2d):
            k_h, k_w = module.kernel_size
            macs = per_image * module.in_channels // module.groups * k_h * k_w
        elif isinstance(module, PackedBinaryConv2d):
            macs = per_image * module.in_channels * module.kernel_size ** 2
        else:
            macs = per_image * module.in_features
        layers[names[module]] = ("bops" if _binary(module) else "flops", macs)

    names = {m: n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, PackedBinaryConv2d))}
    handles = [m.register_forward_hook(hook) for m in names]
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
    return layers


def count_ops(model: nn.Module, input_size=(1, 3, 224, 224)) -> dict:
    """Return {'bops', 'flops', 'ops', 'params'} of `model` for one image of `input_size`[1:].
    A packed network (utils/deploy/packed.py) counts as the float network it was made from."""
    counts = {"bops": 0, "flops": 0}
    for kind, macs in layer_ops(model, input_size).values():
        counts[kind] += macs
    params = sum(p.numel() for p in model.parameters()) + \
        sum(m.float_parameters() for m in model.modules() if isinstance(m, PackedBinaryConv2d))
    return {**counts, "ops": counts["flops"] + counts["bops"] // 64, "params": params}


def summary(model: nn.Module, input_size=(1, 3, 224, 224)) -> tuple[list, dict]:
    """Layer by layer, a step-2 ReActNet-A and its packed form (`utils.deploy.packed.to_packed`).

    Returns (rows, totals). A row is a conv or linear layer, or the rest of a block (BatchNorm,
    PReLU, move biases; a BatchNorm after a binary conv is folded into the packed conv's scale and
    shift, which count here): {layer, kind, params, bits, float_bytes, packed_bytes, bops, flops}.
    Bytes are those of the state_dict tensors (parameters and buffers). totals: the sums, and ops.
    """
    ops = layer_ops(model, input_size)
    params = dict(model.named_parameters())
    rows = {}

    def row_of(key):
        layer, entry = key.rsplit(".", 1)
        if layer not in ops or entry not in ("weight", "bias", "weight_bits", "zero_weights"):
            layer = ".".join(key.split(".")[:2]) + " (BN, PReLU, move)"
        if layer not in rows:
            kind, macs = ops.get(layer, ("flops", 0))
            rows[layer] = {"layer": layer, "kind": "binary" if kind == "bops" else "float", "params": 0,
                           "bits": 1 if kind == "bops" else 32, "float_bytes": 0, "packed_bytes": 0,
                           "bops": macs if kind == "bops" else 0, "flops": macs if kind == "flops" else 0}
        return rows[layer]

    for key, tensor in model.state_dict().items():
        row = row_of(key)
        row["float_bytes"] += tensor.numel() * tensor.element_size()
        row["params"] += params[key].numel() if key in params else 0
    for key, tensor in to_packed(copy.deepcopy(model)).state_dict().items():
        row_of(key)["packed_bytes"] += tensor.numel() * tensor.element_size()
    # Each block's convs, then the rest of it.
    blocks = list(dict.fromkeys(".".join(layer.split(" ")[0].split(".")[:2]) for layer in rows))
    rows = sorted(rows.values(), key=lambda r: (
        blocks.index(".".join(r["layer"].split(" ")[0].split(".")[:2])), " " in r["layer"]))
    totals = {k: sum(r[k] for r in rows) for k in ("params", "float_bytes", "packed_bytes", "bops", "flops")}
    totals["ops"] = totals["flops"] + totals["bops"] // 64
    return rows, totals
