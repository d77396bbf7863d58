"""The embedded demo data set and its teacher.

scikit-learn ships a real data set inside its package: the UCI handwritten digits
(`sklearn.datasets.load_digits`, 1,797 grey 8x8 images, 10 classes). This module turns it into
the same ImageFolder layout as ImageNet, so that `demo.sh` can run the very same entry points
(`step1/run.sh`, `step2/run.sh`, `evaluate.py`) on any CPU without downloading anything:

    python -m utils.demo.digits export --out DIR            # DIR/train/<class>/*.png, DIR/val/<class>/*.png
    python -m utils.demo.digits teacher --data DIR --out FILE --epochs N
        # a ResNet-34 (torchvision, 10 classes, random init) trained with labels; FILE is a
        # state_dict that the trainer's --teacher-weights accepts

The split is fixed (stratified, `--val-fraction` 0.2, `--seed` 0: 1,437 train and 360 val
images); each 8x8 image (16 grey levels, white ink on black) is upscaled to `--size` (32) and
stored as an RGB PNG named after its index in `load_digits()`.
"""
import argparse
import json
import os
import shutil
import sys
import time

from ..cli import Parser, exit_on_error
from ..errors import UserError

__all__ = ["export", "train_teacher", "get_parser", "main", "MANIFEST", "CLASSES"]

MANIFEST = "digits_export.json"
CLASSES = [str(c) for c in range(10)]


def _expected(size: int, val_fraction: float, seed: int) -> dict:
    """The manifest an export with these settings writes (counts included)."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(index, test_size=val_fraction, random_state=seed,
                                          stratify=digits.target)
    split = {"train": sorted(int(i) for i in train_idx), "val": sorted(int(i) for i in val_idx)}
    counts = {name: {c: int((digits.target[idx] == int(c)).sum()) for c in CLASSES}
              for name, idx in split.items()}
    manifest = {"source": "sklearn.datasets.load_digits", "size": size,
                "val_fraction": val_fraction, "seed": seed, "counts": counts}
    return manifest, digits, split


def _is_complete(out: str, manifest: dict) -> bool:
    """True when `out` holds an export with exactly these settings and every file is there."""
    try:
        with open(os.path.join(out, MANIFEST)) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return False
    if found != manifest:
        return False
    for split, counts in manifest["counts"].items():
        for c, n in counts.items():
            folder = os.path.join(out, split, c)
            if not os.path.isdir(folder):
                return False
            if sum(name.endswith(".png") for name in os.listdir(folder)) != n:
                return False
    return True


def export(out: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0,
           verbose: bool = True) -> bool:
    """Write the digits to `out`/{train,val}/<class>/<index>.png; returns True if it wrote them.

    Idempotent: a complete export with the same settings is left as it is (returns False). The
    files are written to `out`.partial and renamed at the end, so an interrupted export never
    looks complete. An existing `out` that is not such an export is never overwritten.
    """
    from PIL import Image

    out = os.path.abspath(out)
    manifest, digits, split = _expected(size, val_fraction, seed)
    if _is_complete(out, manifest):
        if verbose:
            print(f"digits: {out} is already a complete export, nothing to do")
        return False
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"{out} exists but is not a complete digits export with these settings (size "
                        f"{size}, val fraction {val_fraction}, seed {seed}): remove it or choose another --out")

    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # left over by an interrupted export
    for name, idx in split.items():
        for i in idx:
            folder = os.path.join(partial, name, str(int(digits.target[i])))
            os.makedirs(folder, exist_ok=True)
            # 0..16 grey levels -> 0..255, white ink on black, upscaled smoothly, 3 channels.
            pixels = (digits.images[i] * (255.0 / 16.0)).round().clip(0, 255).astype("uint8")
            image = Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR)
            image.convert("RGB").save(os.path.join(folder, f"{i:04d}.png"))
    with open(os.path.join(partial, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    if os.path.isdir(out):
        os.rmdir(out)  # empty (checked above)
    os.replace(partial, out)
    if verbose:
        n = {name: sum(c.values()) for name, c in manifest["counts"].items()}
        print(f"digits: wrote {n['train']} train and {n['val']} val images "
              f"({size}x{size}, 10 classes) to {out}")
    return True


def train_teacher(data: str, out: str, epochs: int = 8, batch_size: int = 32, lr: float = 1e-3,
                  input_size: int = 32, crop_scale: float = 0.3, seed: int = 0, workers: int = 1,
                  results_file: str = None, verbose: bool = True):
    """Train a torchvision ResNet-34 (random init, one output per class of `data`/train) with
    labels and save its state_dict to `out`; returns its val metrics (top1, top5, loss, count).

    Cross-entropy, Adam (lr decayed linearly over the epochs, epoch e at lr * (1 - e/epochs)),
    the repository's train and val transforms at `input_size`, with RandomResizedCrop's smallest
    area `crop_scale` 0.3 instead of the recipe's 0.08 (the teacher is not part of the recipe:
    on ImageNet it is torchvision's; with 0.3 it reaches ~98% in 8 epochs on the digits, with
    0.08 ~95%). The file holds the plain torchvision state_dict, which
    the trainer's --teacher-weights loads into resnet34(num_classes=number of classes).
    `results_file` gets a JSON line (model, weights, epochs, top1, top5, images), as evaluate.py's.
    """
    import torch
    import torch.nn.functional as F
    import torchvision

    from ..checkpoint import atomic_save
    from ..data import train_loader, val_loader
    from ..engine import LoopSettings, evaluate

    torch.manual_seed(seed)
    device = torch.device("cpu")
    train = train_loader(data, batch_size, workers, seed=seed, input_size=input_size,
                         crop_scale=crop_scale)
    val = val_loader(data, 200, workers, input_size=input_size)
    model = torchvision.models.resnet34(weights=None, num_classes=len(train.dataset.classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 - epoch / epochs)
        train.sampler.set_epoch(epoch)
        model.train()
        seen, loss_sum = 0, 0.0
        for images, target, _ in train:  # (digits are all readable)
            loss = F.cross_entropy(model(images), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seen += images.size(0)
            loss_sum += loss.item() * images.size(0)
        metrics = evaluate(model, val, LoopSettings(device=device))
        if verbose:
            print(f"teacher epoch {epoch + 1}/{epochs}: train loss {loss_sum / max(seen, 1):.3f}, "
                  f"val Acc@1 {metrics.top1:.2f} Acc@5 {metrics.top5:.2f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_save(model.state_dict(), out)
    if results_file:
        row = {"model": "resnet34", "weights": os.path.abspath(out), "epochs": epochs,
               "top1": metrics.top1, "top5": metrics.top5, "images": metrics.count}
        os.makedirs(os.path.dirname(os.path.abspath(results_file)), exist_ok=True)
        with open(results_file, "a") as f:
            f.write(json.dumps(row) + "\n")
    if verbose:
        print(f"teacher: ResNet-34 * Acc@1 {metrics.top1:.3f} Acc@5 {metrics.top5:.3f} "
              f"on {metrics.count} val images; weights saved to {out}")
    return metrics


def get_parser() -> Parser:
    parser = Parser(prog="python -m utils.demo.digits", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="write the digits in ImageFolder layout (once)")
    p.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    p = sub.add_parser("teacher", help="train the ResNet-34 teacher with labels")
    p.add_argument("--data", required=True, help="an exported folder (train/ and val/)")
    p.add_argument("--out", required=True, help="file for the teacher's state_dict")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch_size", "--batch-size", type=int, default=32)
    p.add_argument("--learning_rate", "--lr", type=float, default=1e-3)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--crop-scale", type=float, default=0.3,
                   help="smallest area fraction of RandomResizedCrop (the students' recipe: 0.08)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-j", "--workers", type=int, default=1)
    p.add_argument("--results-file", default=None, help="append a JSON line with the val accuracy")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    with exit_on_error():
        if args.command == "export":
            export(args.out, args.size, args.val_fraction, args.seed)
        else:
            train_teacher(args.data, args.out, args.epochs, args.batch_size, args.learning_rate,
                          args.input_size, args.crop_scale, args.seed, args.workers, args.results_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
