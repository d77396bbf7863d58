"""The `torch` data backend: decode and augment on the training device (nvjpeg on CUDA).

Loader workers only read each file's bytes and its header and draw the augmentation parameters,
with the PIL path's own calls in its order after the same per-sample seeding
(utils.data.SeededImageFolder): RandomResizedCrop.get_params on the lazily opened image, then
Lighting's offset, then RandomHorizontalFlip's draw. The parameters are therefore the PIL path's
for the same (seed, epoch, index). The training process then decodes the batch in one
TorchCodec `decode_jpeg` call on the device (libjpeg-turbo on the CPU, nvjpeg on CUDA) and crops,
resizes, jitters, flips and normalizes it with batched tensor operations (`Prepare`).

The resize is Pillow's bilinear resampling reproduced exactly: Pillow's coefficients (computed
the way Pillow computes them, in float64), its 22-bit fixed-point weights and integer arithmetic,
its horizontal-then-vertical order with the uint8 rounding in between. From the same decoded
pixels the images are the PIL path's to the bit; they differ only where the decoder does (nvjpeg
against libjpeg-turbo on CUDA).

Files that batched call cannot take are decoded on the CPU by PIL, the PIL path's own decoder:
a JPEG that is not 3-channel YCbCr/RGB (CMYK, grayscale: nvjpeg does not take them), one without
its end-of-image marker (PIL refuses a truncated JPEG), one with an EXIF orientation (TorchCodec's
decoders turn the image as the tag says, PIL's loader does not), any other format. A file nothing
decodes is left out of the batch and reported in `Batch.bad`.

TorchCodec is this backend's dependency alone: where it is missing or does not load with this
torch, the module still imports, and `check_decoder` (run by the entry points' flag checks before
anything starts, and by `Prepare`) says in one line what to install.
"""
import io
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError

from .data import (IMAGENET_MEAN, IMAGENET_STD, Batch, SeededDistributedSampler, ShardSampler,
                   Unreadable, data_loader, image_folder, train_transform)
from .errors import ConfigError

try:
    from torchcodec.decoders import decode_jpeg
    _decoder_error = None
except Exception as e:  # noqa: BLE001 -- absent, too old, or built for another torch (its libraries do not load)
    decode_jpeg, _decoder_error = None, e

__all__ = ["torch_train_loader", "torch_val_loader", "Prepare", "resized_crops", "check_decoder", "TORCHCODEC"]

# requirements.txt's pin (tests/test_docs.py checks that they agree). TorchCodec's JPEG decoder came
# in 0.16, which works with torch 2.11 and later, as every release since 0.12 (TorchCodec's table).
TORCHCODEC = "torchcodec==0.17.0"
DECODER_TORCH = (2, 11)

PRECISION_BITS = 22  # Pillow's fixed-point resampling weights (32 - 8 - 2 bits)
JPEG_EOI = b"\xff\xd9"


@dataclass
class EncodedImage:
    """One sample as a worker hands it on: the file's bytes, its header and drawn parameters.
    geometry: (top, height, resized height, offset, left, width, resized width, offset) -- the
    input rows/columns resized, the size they are resized to and the first output pixel kept."""
    path: str
    data: bytes = b""
    image: Image.Image | None = None  # opened lazily: header only, never decoded in the worker
    error: str = ""
    geometry: tuple = (0,) * 8
    offset: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=np.float32))
    flip: bool = False


def read_encoded(path: str) -> EncodedImage:
    """The ImageFolder loader of this backend: the bytes and the header, no decoding."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return EncodedImage(path, data, Image.open(io.BytesIO(data)))
    except UnidentifiedImageError:
        return EncodedImage(path, error="cannot identify image file")
    except Exception as e:  # noqa: BLE001 -- any unreadable header is a bad file, not a crash
        return EncodedImage(path, error=str(e))


class TrainParams:
    """The train transform of this backend: draws the PIL train transform's parameters with its
    own objects, calls and order (see the module docstring)."""

    def __init__(self, input_size=224, crop_scale=0.08, lighting=0.1):
        self.size = input_size
        self.crop, self.lighting, self.flip = train_transform(input_size, crop_scale, lighting).transforms[:3]

    def __call__(self, sample: EncodedImage) -> EncodedImage:
        if sample.error:
            return sample
        i, j, h, w = self.crop.get_params(sample.image, self.crop.scale, self.crop.ratio)
        sample.offset = self.lighting.offset()
        sample.flip = bool(torch.rand(1) < self.flip.p)
        sample.geometry = (i, h, self.size, 0, j, w, self.size, 0)
        return sample


class ValParams:
    """The val transform's geometry: Resize(round(size * 256 / 224)) of the shorter side, as
    torchvision computes the other side, then CenterCrop(size)."""

    def __init__(self, input_size=224):
        self.size, self.resize = input_size, round(input_size * 256 / 224)

    def __call__(self, sample: EncodedImage) -> EncodedImage:
        if sample.error:
            return sample
        w, h = sample.image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize, int(self.resize * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))
        sample.geometry = (0, h, new_h, top, 0, w, new_w, left)
        return sample


def collate_encoded(samples) -> dict:
    """A batch of encoded images: all bytes in one buffer (one pin, one transfer between
    processes), the parameters as tensors."""
    records, targets = zip(*samples)
    # A file that could not even be opened comes as utils.data.Unreadable.
    records = [EncodedImage(r.path, error=r.reason) if isinstance(r, Unreadable) else r for r in records]
    data = np.frombuffer(b"".join(r.data for r in records), dtype=np.uint8).copy()
    return {
        "data": torch.from_numpy(data),
        "lengths": torch.tensor([len(r.data) for r in records], dtype=torch.int64),
        "size": torch.tensor([r.image.size[::-1] if r.image else (0, 0) for r in records],
                             dtype=torch.int64),  # (height, width) from the header
        "nvjpeg": torch.tensor([_nvjpeg_can_decode(r) for r in records]),
        "geometry": torch.tensor([r.geometry for r in records], dtype=torch.int64),
        "offset": torch.from_numpy(np.stack([r.offset for r in records]).astype(np.float32)),
        "flip": torch.tensor([r.flip for r in records]),
        "target": torch.tensor(targets, dtype=torch.int64),
        "paths": [r.path for r in records],
        "errors": [r.error for r in records],
    }


def _nvjpeg_can_decode(r: EncodedImage) -> bool:
    """A 3-channel JPEG that ends with its end-of-image marker and has no EXIF orientation: nvjpeg
    does not take CMYK or grayscale, a truncated file must go where it is refused (PIL), and
    TorchCodec would rotate or mirror an oriented image where the PIL path does not."""
    return (not r.error and r.image.format == "JPEG" and r.image.mode == "RGB"
            and r.data.endswith(JPEG_EOI) and not _exif_oriented(r.image))


def _exif_oriented(image: Image.Image) -> bool:
    """An orientation tag other than 1 in the header's EXIF (or XMP, which PIL reads too), or
    EXIF that does not parse: either way PIL, which ignores it, decodes the file."""
    try:
        return image.getexif().get(ExifTags.Base.Orientation, 1) != 1
    except Exception:  # noqa: BLE001 -- whatever PIL cannot parse, TorchCodec may still apply
        return True


# ---------------------------------------------------------------------------------------------
# Pillow's bilinear resampling, batched


def _coefficients(start, length, out_size, offset, size):
    """Pillow's bilinear (antialiased) resampling weights (Resample.c: precompute_coeffs and
    normalize_coeffs_8bpc) along one axis, for each image: input pixels start .. start+length-1
    resized to out_size pixels, of which `size` are kept from `offset` on (int64 tensors [N]).
    Returns the first input pixel each output pixel reads [N, size] (absolute), how many it reads
    [N, size], and their fixed-point weights [N, size, K] (int32, zero past the count)."""
    f64 = torch.float64
    scale = (length.to(f64) / out_size.to(f64))[:, None]
    filterscale = scale.clamp(min=1.0)
    support = filterscale  # the bilinear filter's support is 1
    center = (offset[:, None] + torch.arange(size) + 0.5).to(f64) * scale
    first = (center - support + 0.5).trunc().clamp(min=0)
    count = (torch.minimum((center + support + 0.5).trunc(), length[:, None].to(f64)) - first).long()
    taps = torch.arange(int(count.max()), dtype=f64)
    x = ((taps + first[..., None]) - center[..., None] + 0.5) * (1.0 / filterscale)[..., None]
    w = torch.where(taps < count[..., None], (1.0 - x.abs()).clamp(min=0.0), 0.0)
    total = w[..., 0].clone()
    for k in range(1, w.shape[-1]):  # Pillow's summation order, for the same float64 total
        total += w[..., k]
    w = w / torch.where(total != 0, total, 1.0)[..., None]
    fixed = (0.5 + w * (1 << PRECISION_BITS)).trunc().to(torch.int32)
    return start[:, None] + first.long(), count, fixed


def _clip8(acc):
    """Pillow's clip8: the fixed-point sum (rounding bias included) to 0..255."""
    return (acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def resized_crops(images: list, geometry: torch.Tensor, size: int) -> torch.Tensor:
    """Resize and crop uint8 images [3, H_i, W_i] (on one device, any sizes) as Pillow does
    (see EncodedImage for `geometry`, a CPU int64 tensor [N, 8]): a uint8 batch [N, 3, size,
    size].

    Pillow (13) resizes vertically first when max(in_h - out_h, 0) > 2 * max(in_w - out_w, 0),
    else horizontally first (found by experiment: each order matches it to the bit where it
    chooses it; its earlier C code always went horizontally first). The order matters through
    the uint8 rounding in between. Those images are resized transposed, with the axes of their
    geometry swapped, and their square outputs transposed back."""
    y_shrink = (geometry[:, 1] - geometry[:, 2]).clamp(min=0)
    x_shrink = (geometry[:, 5] - geometry[:, 6]).clamp(min=0)
    vertical_first = y_shrink > 2 * x_shrink
    images = [im.transpose(1, 2) if v else im for im, v in zip(images, vertical_first.tolist())]
    geometry = torch.where(vertical_first[:, None], geometry[:, [4, 5, 6, 7, 0, 1, 2, 3]], geometry)
    out = _horizontal_then_vertical(images, geometry, size)
    return torch.where(vertical_first.to(out.device)[:, None, None, None], out.transpose(2, 3), out)


def _horizontal_then_vertical(images: list, geometry: torch.Tensor, size: int) -> torch.Tensor:
    """resized_crops with Pillow's horizontal pass first. The images are concatenated into one
    flat buffer without padding; each pass is one gather-multiply-add over the whole batch per
    filter tap."""
    device, n = images[0].device, len(images)
    heights = torch.tensor([im.shape[1] for im in images])
    widths = torch.tensor([im.shape[2] for im in images])
    y0, ylen, yout, yoff, x0, xlen, xout, xoff = geometry.unbind(1)
    fy, ny, wy = _coefficients(y0, ylen, yout, yoff, size)
    fx, nx, wx = _coefficients(x0, xlen, xout, xoff, size)
    # Horizontal pass over the input rows the vertical pass reads (rows r0 .. r0+rows-1 of each
    # channel), as Pillow does first; the result is rounded to uint8, as Pillow's is.
    r0, rows = fy[:, 0], fy[:, -1] + ny[:, -1] - fy[:, 0]
    plane = heights * widths
    image_start = torch.cumsum(3 * plane, 0) - 3 * plane
    row_image = torch.repeat_interleave(torch.arange(n), 3 * rows)  # the image of each row
    first_row = torch.cumsum(3 * rows, 0) - 3 * rows
    q = torch.arange(len(row_image)) - first_row[row_image]  # channel * rows + row
    channel, row = q // rows[row_image], q % rows[row_image]
    row_start = (image_start[row_image] + channel * plane[row_image]
                 + (r0[row_image] + row) * widths[row_image])
    # Taps past a pixel's count have weight 0 but must index inside the buffer: zero padding.
    flat = torch.cat([im.reshape(-1) for im in images] + [images[0].new_zeros(wx.shape[-1])])
    row_image, wx = row_image.to(device), wx.to(device)
    index = row_start.to(device)[:, None] + fx.to(device).index_select(0, row_image)
    acc = torch.full(index.shape, 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=device)
    for k in range(wx.shape[-1]):
        acc += flat.take(index).int() * wx[:, :, k].index_select(0, row_image)
        index += 1
    horizontal = torch.cat([_clip8(acc), acc.new_zeros(wy.shape[-1], size, dtype=torch.uint8)])
    # Vertical pass: output row y of image i, channel c reads rows fy - r0 + k of its block.
    block = first_row[:, None] + torch.arange(3) * rows[:, None]  # [N, 3]
    index = (block[:, :, None] + (fy - r0[:, None])[:, None, :]).to(device).view(-1)
    wy = wy.to(device)
    acc = torch.full((n, 3, size, size), 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=device)
    for k in range(wy.shape[-1]):
        acc += horizontal.index_select(0, index).view(n, 3, size, size).int() * wy[:, None, :, k, None]
        index += 1
    return _clip8(acc)


# ---------------------------------------------------------------------------------------------
# Decoding and the batch


def check_decoder() -> None:
    """ConfigError, in one line that says what to install for this torch, where TorchCodec's
    decode_jpeg did not import."""
    if decode_jpeg is not None:
        return
    why = f"{type(_decoder_error).__name__}: {(str(_decoder_error).strip().splitlines() or [''])[0]}"
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < DECODER_TORCH:
        fix = (f"its JPEG decoder (TorchCodec 0.16 and later) needs torch {'.'.join(map(str, DECODER_TORCH))} or "
               f"later, and this is torch {torch.__version__}")
    else:
        fix = f"pip install {TORCHCODEC} (TorchCodec 0.16 and later work with this torch, {torch.__version__})"
    raise ConfigError(f"the torch data backend (--data-backend torch) decodes with TorchCodec, which does not import "
                      f"here ({why}): {fix}; the pil backend, the default, does not need it")


def _decode_on_cpu(blob: torch.Tensor) -> torch.Tensor:
    """PIL's decode and RGB conversion, as in the PIL path (its message is the reason when it
    refuses the file)."""
    with Image.open(io.BytesIO(blob.numpy().tobytes())) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()


class Prepare:
    """`prepare(batch, device)` -> utils.data.Batch: decode on `device`, then resize/crop (and for
    training Lighting and flip) and normalize, all batched. `take_counts()`: counts since the
    last call -- images decoded, CPU fallbacks, bad files, batched decode calls that failed and
    were redone image by image."""

    def __init__(self, input_size: int, train: bool):
        check_decoder()
        self.size, self.train = input_size, train
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.counts = self._zero_counts()

    @staticmethod
    def _zero_counts():
        return {"decoded": 0, "cpu_decoded": 0, "bad": 0, "batch_decode_failures": 0}

    def take_counts(self) -> dict:
        counts, self.counts = self.counts, self._zero_counts()
        return counts

    def _decode(self, batch, device):
        """The decoded images [3, H, W] on `device` (None where nothing decodes) and the reasons."""
        ends = torch.cumsum(batch["lengths"], 0).tolist()
        blobs = [batch["data"][e - n:e] for e, n in zip(ends, batch["lengths"].tolist())]
        sizes = [tuple(s) for s in batch["size"].tolist()]
        reasons = list(batch["errors"])
        images = [None] * len(blobs)
        on_device = [i for i, ok in enumerate(batch["nvjpeg"].tolist()) if ok]
        if on_device:
            try:
                decoded = decode_jpeg([blobs[i] for i in on_device], mode="RGB", device=device)
            except RuntimeError:  # find the culprit(s): image by image
                self.counts["batch_decode_failures"] += 1
                decoded = [self._decode_one(blobs[i], device) for i in on_device]
            for i, image in zip(on_device, decoded):
                if image is not None and tuple(image.shape) == (3, *sizes[i]):
                    images[i] = image
        for i, blob in enumerate(blobs):
            if images[i] is None and not reasons[i]:
                try:
                    images[i] = _decode_on_cpu(blob).to(device, non_blocking=True)
                    self.counts["cpu_decoded"] += 1
                except Exception as e:  # noqa: BLE001 -- an undecodable file is a bad file
                    reasons[i] = str(e) or type(e).__name__
        return images, reasons

    @staticmethod
    def _decode_one(blob, device):
        try:
            return decode_jpeg([blob], mode="RGB", device=device)[0]
        except RuntimeError:
            return None

    def __call__(self, batch: dict, device) -> Batch:
        device = torch.device(device)
        images, reasons = self._decode(batch, device)
        keep = [i for i, image in enumerate(images) if image is not None]
        bad = [(batch["paths"][i], reasons[i]) for i in range(len(images)) if images[i] is None]
        self.counts["decoded"] += len(keep)
        self.counts["bad"] += len(bad)
        target = batch["target"][keep].to(device, non_blocking=True)
        if not keep:
            return Batch(torch.empty(0, 3, self.size, self.size, device=device), target, bad)
        x = resized_crops([images[i] for i in keep], batch["geometry"][keep], self.size).float()
        if self.train:
            # Lighting as utils.data.Lighting: add to the uint8 crop, clip, truncate to uint8.
            offset = batch["offset"][keep].to(device, non_blocking=True)
            x = (x + offset[:, :, None, None]).clamp_(0, 255).trunc_()
            flip = batch["flip"][keep].to(device, non_blocking=True)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        # ToTensor and Normalize, in their order and dtype.
        x = x.div_(255).sub_(self.mean.to(device)).div_(self.std.to(device))
        return Batch(x, target, bad)


def torch_train_loader(root, batch_size, workers, world_size=1, rank=0, seed=0, pin_memory=False,
                       input_size=224, crop_scale=0.08, lighting=0.1):
    """(loader, prepare) for training; `batch_size` is the per-process batch. Call
    `loader.sampler.set_epoch(e)` every epoch; `prepare(batch, device)` gives the Batch."""
    ds = image_folder(root, "train", TrainParams(input_size, crop_scale, lighting), read_encoded)
    sampler = SeededDistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True,
                                       seed=seed)
    return data_loader(ds, sampler, batch_size, workers, pin_memory, collate_encoded), Prepare(input_size, train=True)


def torch_val_loader(root, batch_size, workers, world_size=1, rank=0, pin_memory=False, input_size=224):
    """(loader, prepare) for evaluation: each image of this process's shard once, in order."""
    ds = image_folder(root, "val", ValParams(input_size), read_encoded)
    return (data_loader(ds, ShardSampler(ds, world_size, rank), batch_size, workers, pin_memory, collate_encoded),
            Prepare(input_size, train=False))
