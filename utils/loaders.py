"""The loaders of training and evaluation over either data backend: `build_loader` gives a
split's loader and its `prepare(batch, device)`, which turns a loaded batch into a
utils.data.Batch on the device, for `--data-backend pil` (utils/data.py: decode and augment in
the loader workers) or `torch` (utils/torch_data.py: decode and augment on the device).
"""
from .data import default_workers, to_device, train_loader, val_loader

__all__ = ["build_loader"]


def build_loader(split: str, backend: str, root: str, batch_size: int, info, *, workers=None,
                 input_size=224, seed=0, fast_decode=False, log=print):
    """(loader, prepare) of `split` ('train' or 'val') for the data backend `backend` ('pil' or
    'torch'): `prepare(batch, device)` turns a loaded batch into a Batch on the device.
    `batch_size` is the global batch, split over the processes of `info` (a DistInfo); `workers`
    per process (default: default_workers). Training leaves out a last batch of one image per
    process where the network's last feature maps are 1x1 (input size 32), which BatchNorm cannot
    train on, and says so."""
    workers = default_workers(info.local_world_size) if workers is None else workers
    batch_size //= info.world_size
    common = dict(world_size=info.world_size, rank=info.rank, pin_memory=info.device.type == "cuda",
                  input_size=input_size)
    if backend == "torch":
        from .torch_data import torch_train_loader, torch_val_loader  # TorchCodec: only when asked for
        if split == "train":
            loader, prepare = torch_train_loader(root, batch_size, workers, seed=seed, **common)
        else:
            loader, prepare = torch_val_loader(root, batch_size, workers, **common)
    elif split == "train":
        loader, prepare = train_loader(root, batch_size, workers, seed=seed, fast_decode=fast_decode,
                                       **common), to_device
    else:
        loader, prepare = val_loader(root, batch_size, workers, **common), to_device
    sampler = loader.sampler
    if split == "train" and input_size < 64 and sampler.num_samples % batch_size == 1:
        sampler.drop = 1
        log(f"=> the last batch of each epoch would hold one image per process, and BatchNorm cannot "
            f"train on one image with 1x1 feature maps (--input-size {input_size}): it is left out, "
            f"{info.world_size} image(s) an epoch")
    return loader, prepare
