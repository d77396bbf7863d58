"""ImageFolder datasets, the original transforms (with Lighting), samplers and the PIL backend's
loaders (utils/loaders.py chooses between the two backends).

Unreadable images: a file that cannot be read (truncated, corrupt, not an image) does not raise
inside the loader; its sample comes as `Unreadable(path, reason)` and the batch lists it in
`Batch.bad`, so that the training loop can name it and apply its policy (stop, or skip up to
--skip-bad-images N per epoch) and validation can fail only after the epoch is saved.

Randomness: the random transforms of sample i in epoch e draw from the global torch generator
seeded with (seed, e, i) just before the sample is loaded. The augmentation of every image is
thereby fixed by the seed alone, whatever the number of loader workers or processes, and a
resumed run sees exactly the images an uninterrupted run would have seen.
"""
import atexit
import functools
import itertools
import os
import signal
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, Sampler, default_collate
from torchvision import datasets, transforms

from . import recipe
from .errors import DataError
from .preempt import STOP_SIGNALS

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# AlexNet's PCA of ImageNet pixel colours (eigenvalues on a 0-1 scale, as in the original).
IMAGENET_PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045], dtype=np.float32)
IMAGENET_PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                                [-0.5808, -0.0045, -0.8140],
                                [-0.5836, -0.6948, 0.4203]], dtype=np.float32)


@dataclass
class Batch:
    """A batch ready for the model, as the engine receives it from either data backend:
    normalized float images and class indices on the training device, and the images of the
    loaded batch that could not be read and were left out, as (path, reason) pairs."""
    images: torch.Tensor
    target: torch.Tensor
    bad: list = field(default_factory=list)


@dataclass
class Unreadable:
    """In place of a sample whose file could not be read."""
    path: str
    reason: str


def to_device(raw, device) -> Batch:
    """The PIL backend's `prepare`: a collated (images, target[, bad]) batch onto `device`."""
    images, target, *bad = raw
    return Batch(images.to(device, non_blocking=True), target.to(device, non_blocking=True),
                 bad[0] if bad else [])


def collate_images(samples) -> tuple:
    """default_collate of the readable samples, plus the (path, reason) of the unreadable ones."""
    good = [s for s in samples if not isinstance(s[0], Unreadable)]
    bad = [(s[0].path, s[0].reason) for s in samples if isinstance(s[0], Unreadable)]
    if not good:
        return torch.empty(0, 3, 1, 1), torch.empty(0, dtype=torch.long), bad
    return (*default_collate(good), bad)


def default_workers(local_world_size: int = 1) -> int:
    """Loader workers per process: the CPUs this process may run on (its affinity: what SLURM
    and cgroups leave it, not the machine's count), shared by the processes of the node, <= 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, max(1, cpus // local_world_size))


class Lighting:
    """AlexNet PCA colour jitter on a PIL image, exactly as the original: alpha ~ N(0, std) per
    eigenvector, offset = eigvec @ (alpha * eigval) added to every uint8 pixel, clipped to
    [0, 255], truncated back to uint8. The original draws alpha from numpy's global generator;
    here it comes from torch's, so that the seeding described above covers it."""

    def __init__(self, alphastd: float, eigval=IMAGENET_PCA_EIGVAL, eigvec=IMAGENET_PCA_EIGVEC):
        self.alphastd, self.eigval, self.eigvec = alphastd, eigval, eigvec

    def offset(self) -> np.ndarray:
        """Draw alpha and return the offset added to the pixels (float32, one per channel); zeros,
        drawing nothing, when alphastd is 0. The torch data backend draws it here too."""
        if self.alphastd == 0:
            return np.zeros(3, dtype=np.float32)
        alpha = torch.randn(3).numpy().astype(np.float32) * np.float32(self.alphastd)
        return (self.eigvec @ (alpha * self.eigval).reshape(3, 1)).reshape(3)

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.alphastd == 0:
            return img
        pixels = np.clip(np.asarray(img, dtype=np.uint8) + self.offset(), 0, 255)
        return Image.fromarray(pixels.astype(np.uint8), "RGB")

    def __repr__(self):
        return f"{type(self).__name__}(alphastd={self.alphastd})"


def train_transform(input_size=224, crop_scale=recipe.COMMON["crop_scale"], lighting=recipe.COMMON["lighting"]):
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(crop_scale, 1.0)),
        Lighting(lighting),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def val_transform(input_size=224):
    """Resize(256) -> CenterCrop(224) at 224; other sizes keep the 0.875 crop ratio."""
    return transforms.Compose([
        transforms.Resize(round(input_size * 256 / 224)),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def draft_loader(path: str, size: int) -> Image.Image:
    """Opt-in faster decode (--fast-decode): a JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale
    (the smallest keeping both sides >= `size`) instead of at full size; other formats decode as
    usual. Faster for JPEGs over twice the crop size; the pixels differ from a full decode."""
    with open(path, "rb") as f:
        img = Image.open(f)
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        return img.convert("RGB")


def is_image_file(path: str) -> bool:
    """ImageFolder's image extensions, hidden files (.DS_Store, macOS's ._ files) left out."""
    return not os.path.basename(path).startswith(".") and path.lower().endswith(datasets.folder.IMG_EXTENSIONS)


class SeededImageFolder(datasets.ImageFolder):
    """ImageFolder whose samples may be requested as (index, seed): the global torch generator is
    then seeded with `seed` before the image is transformed (see the module docstring). With
    `-j 0` that is the main process's generator; nothing else in training draws from it. Hidden
    folders (.ipynb_checkpoints, .git) are not classes."""

    def find_classes(self, directory):
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: i for i, name in enumerate(classes)}

    def __getitem__(self, key):
        if isinstance(key, tuple):
            key, seed = key
            torch.default_generator.manual_seed(seed)
        path, target = self.samples[key]
        try:
            sample = self.loader(path)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... for bad files
            return Unreadable(path, f"{type(e).__name__}: {e}"), target
        return self.transform(sample), target


def image_folder(root: str, split: str, transform, loader=None) -> SeededImageFolder:
    folder = os.path.join(root, split)
    if not os.path.isdir(root):
        raise DataError(f"data folder {root} does not exist (pass --data DIR or set DATA)")
    if not os.path.isdir(folder):
        raise DataError(f"{root} has no {split}/ folder: expected the ImageFolder layout "
                        f"{root}/{split}/<class>/<image> (ImageNet: {root}/train and {root}/val)")
    try:
        return SeededImageFolder(folder, transform, loader=loader or datasets.folder.default_loader,
                                 is_valid_file=is_image_file)
    except FileNotFoundError as e:  # no class folders, or class folders without images
        raise DataError(f"{folder} holds no images in <class>/<image> layout ({e})") from None


class SeededDistributedSampler(DistributedSampler):
    """DistributedSampler (shuffled with seed + epoch, padded to equal shards) that hands out
    (index, per-sample seed) pairs, the seed depending on (seed, epoch, index) only.
    `set_epoch(e, start)` skips the first `start` samples of this process's shard: a mid-epoch
    resume sees the rest of the very order it was interrupted in. The last `drop` samples of every
    shard are left out (the same number on every process, so that they stay in step)."""

    start = drop = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        n = len(self.dataset)
        for i in itertools.islice(super().__iter__(), self.start, self.num_samples - self.drop):
            yield i, ((self.seed * 100_003 + self.epoch) * n + i) % (2 ** 63)

    def __len__(self):
        return self.num_samples - self.drop - self.start


class ShardSampler(Sampler):
    """Evaluation shard of one process: indices rank, rank + world, ... in order, not padded, so
    that the shards together hold every image exactly once."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0):
        self.indices = range(rank, len(dataset), num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave stop signals to the training process, which saves and then ends them:
    a scheduler signalling every process of the job (SLURM's scancel and preemption) must not kill
    a worker mid-epoch."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


# The loaders with worker processes, whose workers end_workers ends at exit.
_with_workers = weakref.WeakSet()


@atexit.register  # registered after multiprocessing's exit function (torch imports it first): runs before it
def end_workers() -> None:
    """End the persistent workers of the loaders still alive at exit, as a run that ends with an
    error leaves them (its traceback holds them). Python's own exit would send them SIGTERM, which
    they ignore (ignore_stop_signals), and then wait for them forever."""
    for loader in list(_with_workers):
        if loader._iterator is not None:  # DataLoader keeps the iterator of persistent workers
            loader._iterator._shutdown_workers()  # what the iterator does when freed
            loader._iterator = None


def data_loader(dataset, sampler, batch_size, workers, pin_memory, collate_fn=collate_images):
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=pin_memory, persistent_workers=workers > 0, drop_last=False,
                        prefetch_factor=4 if workers > 0 else None, collate_fn=collate_fn,
                        worker_init_fn=ignore_stop_signals)
    if workers:
        _with_workers.add(loader)
    return loader


def train_loader(root, batch_size, workers, world_size=1, rank=0, seed=0, pin_memory=False,
                 input_size=224, crop_scale=recipe.COMMON["crop_scale"], lighting=recipe.COMMON["lighting"],
                 fast_decode=False):
    """`batch_size` is the per-process batch. Call `loader.sampler.set_epoch(e)` every epoch."""
    loader = functools.partial(draft_loader, size=input_size) if fast_decode else None
    ds = image_folder(root, "train", train_transform(input_size, crop_scale, lighting), loader)
    sampler = SeededDistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True,
                                       seed=seed)
    return data_loader(ds, sampler, batch_size, workers, pin_memory)


def val_loader(root, batch_size, workers, world_size=1, rank=0, pin_memory=False, input_size=224):
    ds = image_folder(root, "val", val_transform(input_size))
    return data_loader(ds, ShardSampler(ds, world_size, rank), batch_size, workers, pin_memory)


def check_same_classes(train, val, root: str) -> list:
    """The class folders, the same in train/ and val/ (else DataError naming the differences)."""
    if val.classes != train.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise DataError(f"train/ and val/ of {root} have different class folders ({len(train.classes)} "
                        f"and {len(val.classes)}): only in train/: {only_train or 'none'}, only in val/: "
                        f"{only_val or 'none'} (the first of each); both need the same <class> folders")
    return train.classes
