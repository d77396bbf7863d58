"""ImageNet-ReaL (Beyer et al., "Are we done with ImageNet?", 2020): the reassessed labels of
ImageNet's 50,000 validation images, the `real.json` of google-research/reassessed-imagenet.
Entry i (from 0) is the list of class indices (ImageNet's classes in sorted wnid order) judged
right for `ILSVRC2012_val_{i + 1:08d}.JPEG`, empty where the raters kept none. An image is
right at top-k when one of its k highest logits is one of its labels; images without labels
are not counted.

Images are matched to their labels by file name (any extension, in any class folder), never by
their order: a folder that holds a file of another name, an image past the list's end or one
image twice is refused before the pass.
"""
import json
import os
import re

import torch

from .distributed import all_reduce_sum
from .errors import ConfigError, DataError

__all__ = ["read_real_labels", "check_real_labels", "labels_of_images", "RealScorer"]

VAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})\.\w+")


def read_real_labels(path: str) -> list:
    """The list of a real.json file (read before anything else: check_real_labels checks its
    entries against the network's classes)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--real-labels {path} does not exist: give ImageNet-ReaL's real.json "
                          "(github.com/google-research/reassessed-imagenet)")
    try:
        with open(path) as f:
            labels = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"--real-labels {path} is not a JSON file ({e}): give ImageNet-ReaL's real.json") from None
    if not isinstance(labels, list):
        raise DataError(f"--real-labels {path} holds a {type(labels).__name__}, not a list of label lists "
                        "(ImageNet-ReaL's real.json: one list per validation image)")
    return labels


def check_real_labels(labels: list, num_classes: int, path: str) -> None:
    """Each entry of real.json's `labels` (read from `path`) a list of class indices below `num_classes`."""
    for i, entry in enumerate(labels):
        if not (isinstance(entry, list) and all(type(c) is int and 0 <= c < num_classes for c in entry)):
            raise DataError(f"--real-labels {path}: entry {i} ({str(entry)[:40]}) is not a list of class indices "
                            f"0..{num_classes - 1}, the network's classes")


def labels_of_images(paths: list, labels: list, real_path: str) -> list:
    """The label list of each image of `paths`, matched by file name (ILSVRC2012_val_00000001.*
    is entry 0)."""
    found, seen = [], {}
    for path in paths:
        match = VAL_FILE.fullmatch(os.path.basename(path))
        if not match:
            raise DataError(f"{path} is not named as an ImageNet validation image (ILSVRC2012_val_NNNNNNNN.JPEG): "
                            "--real-labels matches images to their labels by file name; evaluate ImageNet's val "
                            "folder with its original file names")
        number = int(match.group(1))
        if not 1 <= number <= len(labels):
            raise DataError(f"{path} is validation image {number}, but --real-labels {real_path} has labels for "
                            f"images 1..{len(labels)}: the list does not fit the folder")
        if number in seen:
            raise DataError(f"{seen[number]} and {path} are both validation image {number}: keep one")
        seen[number] = path
        found.append(labels[number - 1])
    if not any(found):
        raise DataError(f"none of the {len(paths)} images has a label in --real-labels {real_path}: nothing to score")
    return found


class RealScorer:
    """ReaL top-1 and top-5 of one process's images. `labels`: the label lists of the images in
    the order the loader gives them (its sampler's); called with each batch's logits in that
    order (utils.engine.evaluate's `on_logits`), it sums on the device without waiting for it."""

    def __init__(self, labels: list, device):
        width = max(map(len, labels), default=0) or 1  # each image's labels, padded with -1
        padded = [entry + [-1] * (width - len(entry)) for entry in labels]
        self.labels = torch.tensor(padded, dtype=torch.long).view(len(labels), width).to(device)
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # labelled images, right at 1, at 5
        self.position = 0

    def __call__(self, logits: torch.Tensor) -> None:
        n = logits.size(0)
        labels = self.labels[self.position:self.position + n]
        self.position += n
        values, top = logits.topk(min(5, logits.size(1)), dim=1)
        # A class whose logit is -inf (--present-classes-only) is never predicted.
        hit = (labels[:, :, None] == top[:, None, :]) & (values > float("-inf"))[:, None, :]
        self.sums += torch.stack([(labels >= 0).any(1).sum(), hit[:, :, 0].any(1).sum(),
                                  hit.any(2).any(1).sum()]).double()

    def result(self) -> tuple:
        """(ReaL top-1 %, top-5 %, images with labels) over all processes (collective)."""
        labelled, right1, right5 = all_reduce_sum(self.sums.clone()).tolist()
        return 100 * right1 / labelled, 100 * right5 / labelled, int(labelled)
