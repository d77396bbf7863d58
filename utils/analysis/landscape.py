"""The loss landscape around a checkpoint (the paper's Figure 1), after Li et al. (2018).

    python -m utils.analysis.landscape --checkpoint PATH --data DIR [--step auto|1|2]
        [--grid 21] [--span 1.0] [--subset 256] [--split train] [--out PREFIX]

Two random directions d1, d2 are drawn with the parameters' shapes and *filter-normalized*: for
every filter (output channel of a conv, row of the fc) the direction is rescaled to that filter's
norm, so that the picture does not depend on the weights' scale; biases, BatchNorm and PReLU
parameters and the learnable biases `move*` get a zero direction (Li et al.'s `ignore biasbn`).
The loss L(W + a d1 + b d2) is evaluated on a fixed subset of images for a, b on a grid over
[-span, span]^2, the network in eval mode (BatchNorm uses its running statistics; nothing is
trained). The step-1 network (binary activations, real weights) and the step-2 network (binary
weights: the perturbed latent weights are binarized on the fly) are built from the checkpoint.

Writes PREFIX.npz (a, b, loss, acc, and the settings) and PREFIX.png (surface and contours; needs
matplotlib, an optional extra: `pip install matplotlib`).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import reactnet_a
from utils.checkpoint import (check_classes, checkpoint_step, detect_format, load_weights, num_classes,
                              read_checkpoint, trained_input_size)
from utils.cli import Parser, check_input_size, exit_on_error

__all__ = ["filter_normalized_direction", "loss_surface", "surface_stats", "load_subset",
           "plot_surface", "main"]


def _is_ignored(name: str, p: torch.Tensor) -> bool:
    """Parameters left out of the directions: 1-dim ones (BN, PReLU, biases) and any bias."""
    return p.dim() <= 1 or name.split(".")[-1] == "bias"


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> dict:
    """{parameter name: direction}: Gaussian, each filter rescaled to the norm of the same filter
    of the weights; zero for ignored parameters (see `_is_ignored`)."""
    direction = {}
    for name, p in model.named_parameters():
        w = p.detach()
        if _is_ignored(name, w):
            direction[name] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w)
        dims = tuple(range(1, w.dim()))
        norm = torch.linalg.vector_norm
        d.mul_(norm(w, dim=dims, keepdim=True) / (norm(d, dim=dims, keepdim=True) + 1e-10))
        direction[name] = d
    return direction


@torch.no_grad()
def _loss_and_acc(model, images, labels, batch_size):
    loss = correct = 0.0
    for i in range(0, len(images), batch_size):
        logits = model(images[i:i + batch_size]).float()
        y = labels[i:i + batch_size]
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += float((logits.argmax(1) == y).sum())
    return loss / len(images), 100.0 * correct / len(images)


@torch.no_grad()
def loss_surface(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, grid: int = 21,
                 span: float = 1.0, seed: int = 0, batch_size: int = 256, log=None) -> dict:
    """Loss and accuracy of `model` (eval mode) on (images, labels) at W + a d1 + b d2 for a, b in
    linspace(-span, span, grid). Returns {'a', 'b', 'loss', 'acc'} (numpy; loss[i, j] is at
    a[i], b[j]). The model's parameters are restored afterwards."""
    if grid < 1:
        raise ValueError("grid must be >= 1")
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    d1 = filter_normalized_direction(model, gen)
    d2 = filter_normalized_direction(model, gen)
    params = dict(model.named_parameters())
    origin = {n: p.detach().clone() for n, p in params.items()}
    coords = np.linspace(-span, span, grid) if grid > 1 else np.zeros(1)
    loss = np.zeros((grid, grid))
    acc = np.zeros((grid, grid))
    start = time.perf_counter()
    try:
        for i, a in enumerate(coords):
            for j, b in enumerate(coords):
                for n, p in params.items():
                    p.copy_(origin[n] + float(a) * d1[n] + float(b) * d2[n])
                loss[i, j], acc[i, j] = _loss_and_acc(model, images, labels, batch_size)
            if log is not None:
                done = (i + 1) * grid
                eta = (time.perf_counter() - start) / done * (grid * grid - done)
                log(f"landscape: row {i + 1}/{grid} (a = {a:+.3f}): loss {loss[i].min():.4f} .. "
                    f"{loss[i].max():.4f}; ETA {eta:.0f} s")
    finally:
        for n, p in params.items():
            p.copy_(origin[n])
    return {"a": coords, "b": coords.copy(), "loss": loss, "acc": acc}


def surface_stats(loss: np.ndarray) -> dict:
    """Two numbers for "how rugged": the number of strict local minima of the grid (8-neighbour,
    the border excluded) and the roughness, the mean |discrete Laplacian| divided by the loss
    range (0 for a plane; larger when the surface wiggles between grid points)."""
    loss = np.asarray(loss, dtype=np.float64)
    minima = 0
    for i in range(1, loss.shape[0] - 1):
        for j in range(1, loss.shape[1] - 1):
            around = np.delete(loss[i - 1:i + 2, j - 1:j + 2].reshape(-1), 4)
            minima += int(loss[i, j] < around.min())
    if min(loss.shape) < 3:
        return {"local_minima": minima, "roughness": 0.0}
    lap = (loss[2:, 1:-1] + loss[:-2, 1:-1] + loss[1:-1, 2:] + loss[1:-1, :-2]
           - 4 * loss[1:-1, 1:-1])
    span = float(loss.max() - loss.min())
    return {"local_minima": minima, "roughness": float(np.abs(lap).mean() / span) if span else 0.0}


def load_subset(data: str, split: str, input_size: int, subset: int, seed: int = 0):
    """`subset` images (all if <= 0) of DIR/split, drawn at random with `seed`, through the
    validation transform (no augmentation): (images [N,3,H,W], labels [N])."""
    from utils.data import image_folder, val_transform

    ds = image_folder(data, split, val_transform(input_size))
    n = len(ds)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    if subset > 0:
        order = order[:subset]
    xs, ys = zip(*(ds[i] for i in sorted(order)))
    return torch.stack(xs), torch.tensor(ys), ds.classes


def plot_surface(result: dict, path: str, title: str, vmax: float | None = None) -> bool:
    """Surface plot and contour lines of result['loss'] in one small PNG (False without
    matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    a, b, loss = result["a"], result["b"], np.asarray(result["loss"])
    A, B = np.meshgrid(a, b, indexing="ij")
    shown = np.minimum(loss, vmax) if vmax is not None else loss
    fig = plt.figure(figsize=(9, 3.8))
    ax = fig.add_subplot(1, 2, 1, projection="3d")
    ax.plot_surface(A, B, shown, cmap="viridis", linewidth=0, antialiased=True,
                    rstride=1, cstride=1)
    ax.set_xlabel("d1")
    ax.set_ylabel("d2")
    ax.set_zlabel("loss")
    ax.view_init(elev=35, azim=-60)
    ax2 = fig.add_subplot(1, 2, 2)
    cs = ax2.contour(A, B, loss, levels=20, cmap="viridis", linewidths=0.8)
    ax2.clabel(cs, inline=True, fontsize=6, fmt="%.2f")
    ax2.plot([0], [0], "r+")
    ax2.set_xlabel("d1")
    ax2.set_ylabel("d2")
    ax2.set_aspect("equal")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return True


def build_model(checkpoint: str, step: str):
    """The ReActNet-A of `checkpoint` (either step, this repo's or a released file) and its step."""
    obj = read_checkpoint(checkpoint)
    _, state_dict = detect_format(obj)
    if step == "auto":
        found = checkpoint_step(obj)
        # The released AdamBNN / ReActNet checkpoints are final, step-2 (binary) models.
        step_n = found if found is not None else 2
    else:
        step_n = int(step)
    model = reactnet_a(binary_weights=step_n == 2, num_classes=num_classes(state_dict, checkpoint))
    fmt = load_weights(model, obj)
    return model, step_n, fmt, trained_input_size(obj)


def get_parser():
    p = Parser(prog="python -m utils.analysis.landscape", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="this repository's checkpoint (either step) "
                   "or a released one")
    p.add_argument("--data", required=True, help="ImageFolder root (with train/ and val/)")
    p.add_argument("--split", default="train", choices=("train", "val"),
                   help="images the loss is computed on (Li et al.: the training loss)")
    p.add_argument("--step", default="auto", choices=("auto", "1", "2"),
                   help="1: real weights, 2: binary weights; auto: from the checkpoint "
                        "(released checkpoints: 2)")
    p.add_argument("--grid", type=int, default=21, help="points per axis")
    p.add_argument("--span", type=float, default=1.0, help="the grid covers [-span, span]^2")
    p.add_argument("--subset", type=int, default=256, help="images (0 = all of the split)")
    p.add_argument("--input-size", type=int, default=None,
                   help="image size (default: the checkpoint's --input-size, else 224)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="directions and subset")
    p.add_argument("--vmax", type=float, default=None, help="clip the surface plot at this loss")
    p.add_argument("--no-plot", action="store_true", help="write the .npz only")
    p.add_argument("--out", default=None,
                   help="output prefix (default: landscape_step<N> next to the checkpoint)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    with exit_on_error():
        check_input_size(args.input_size)
        model, step, fmt, ckpt_size = build_model(args.checkpoint, args.step)
        input_size = args.input_size or ckpt_size or 224
        images, labels, classes = load_subset(args.data, args.split, input_size, args.subset, args.seed)
        check_classes(args.checkpoint, model.fc.out_features, len(classes),
                      f"pass --data with the {model.fc.out_features} classes it was trained on")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                   f"landscape_step{step}")
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    kind = "binary weights and activations (step 2)" if step == 2 else \
        "real weights, binary activations (step 1)"
    print(f"landscape: {args.checkpoint} ({fmt}), {kind}; {len(images)} {args.split} images at "
          f"{input_size}x{input_size}; grid {args.grid}x{args.grid} over +-{args.span}", flush=True)
    start = time.perf_counter()
    result = loss_surface(model, images, labels, args.grid, args.span, args.seed, args.batch_size,
                          log=lambda m: print(m, flush=True))
    elapsed = time.perf_counter() - start
    stats = surface_stats(result["loss"])
    settings = {"checkpoint": os.path.abspath(args.checkpoint), "format": fmt, "step": step,
                "split": args.split, "subset": len(images), "input_size": input_size,
                "grid": args.grid, "span": args.span, "seed": args.seed, "seconds": elapsed,
                **stats}
    np.savez(out + ".npz", settings=json.dumps(settings), **result)
    center = result["loss"][args.grid // 2, args.grid // 2] if args.grid % 2 else float("nan")
    print(f"landscape: wrote {out}.npz in {elapsed:.0f} s (loss at the checkpoint {center:.4f}, "
          f"min {result['loss'].min():.4f}, max {result['loss'].max():.4f}; "
          f"{stats['local_minima']} local minima in the grid, roughness {stats['roughness']:.4f})")
    if not args.no_plot:
        title = f"step {step}: " + ("binary weights + activations" if step == 2 else
                                    "real weights, binary activations")
        if plot_surface(result, out + ".png", title, args.vmax):
            print(f"landscape: wrote {out}.png")
        else:
            print("landscape: matplotlib is not installed: no plot (pip install matplotlib)")


if __name__ == "__main__":
    main()
