"""The torch data backend (utils.torch_data) against the PIL path (utils.data) on the CPU: the
same augmentation parameters, the same pixels (decoded, and after crop, resize, Lighting, flip
and normalization: equal, at the pinned Pillow), CPU fallbacks and bad files reported instead of
raised, no deprecated torchvision decoder. Without TorchCodec, or with another Pillow, the tests
that need them are skipped, saying so."""
import io
import os
import shutil

import numpy as np
import pytest
import torch
import torchvision.io
import torchvision.transforms.functional as F
from PIL import ExifTags, Image
from torchvision.datasets.folder import pil_loader

from utils import data, torch_data
from tests.tiny import needs_torchcodec, pinned_pillow
from utils.bench.common import make_jpegs
from utils.errors import DataError

SIZE = 48


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """train/ and val/, two classes, generated photo-like JPEGs larger and smaller than SIZE."""
    root = tmp_path_factory.mktemp("jpegs")
    for c in range(2):
        for split, count, (w, h) in (("train", 5, (120, 90)), ("val", 3, (70, 100))):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            make_jpegs(str(folder), count, w, h, seed=10 * c + len(split))
    return str(root)


def test_parameters_are_the_pil_paths(root):
    """With the parameters the torch backend's worker draws, PIL's own crop, Lighting and flip
    give exactly the PIL train transform's output for the same (seed, epoch, index)."""
    torch_ds = data.image_folder(root, "train", torch_data.TrainParams(SIZE), torch_data.read_encoded)
    pil_ds = data.image_folder(root, "train", data.train_transform(SIZE))
    sampler = data.SeededDistributedSampler(pil_ds, num_replicas=1, rank=0, shuffle=True, seed=5)
    sampler.set_epoch(3)
    flips = set()
    for key in sampler:
        sample, target = torch_ds[key]
        expected, expected_target = pil_ds[key]
        i, h, _, _, j, w, _, _ = sample.geometry
        img = F.resized_crop(pil_loader(sample.path), i, j, h, w, [SIZE, SIZE])
        pixels = np.clip(np.asarray(img, dtype=np.uint8) + sample.offset, 0, 255).astype(np.uint8)
        if sample.flip:
            pixels = pixels[:, ::-1]
        rebuilt = F.normalize(F.to_tensor(pixels.copy()), data.IMAGENET_MEAN, data.IMAGENET_STD)
        assert torch.equal(rebuilt, expected) and target == expected_target
        assert np.abs(sample.offset).max() > 0
        flips.add(sample.flip)
    assert flips == {True, False}


@pinned_pillow
def test_resampling_equals_pil_for_fixed_crops(root):
    """Crops of every shape (up- and downscaling), decoded the same way, resized by both."""
    gen = torch.Generator().manual_seed(0)
    images, geometry, expected = [], [], []
    for path in sorted(data.image_folder(root, "train", None).samples)[:4]:
        pil = pil_loader(path[0])
        decoded = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
        for _ in range(25):
            h, w = (int(torch.randint(1, n + 1, (1,), generator=gen)) for n in (90, 120))
            i = int(torch.randint(0, 91 - h, (1,), generator=gen))
            j = int(torch.randint(0, 121 - w, (1,), generator=gen))
            images.append(decoded)
            geometry.append((i, h, SIZE, 0, j, w, SIZE, 0))
            crop = F.resized_crop(pil, i, j, h, w, [SIZE, SIZE])
            expected.append(torch.from_numpy(np.array(crop)).permute(2, 0, 1))
    out = torch_data.resized_crops(images, torch.tensor(geometry), SIZE)
    assert out.dtype == torch.uint8 and out.shape == (100, 3, SIZE, SIZE)
    assert torch.equal(out, torch.stack(expected))


@needs_torchcodec
@pinned_pillow
def test_train_batches_match_pil(root):
    loader, prepare = torch_data.torch_train_loader(root, 4, 0, seed=1, input_size=SIZE)
    pil = data.train_loader(root, 4, 0, seed=1, input_size=SIZE)
    assert isinstance(loader.sampler, data.SeededDistributedSampler)
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        pil.sampler.set_epoch(epoch)
        for batch, (images, target, _) in zip(loader, pil, strict=True):
            b = prepare(batch, "cpu")
            assert b.images.dtype == torch.float32 and torch.equal(b.images, images)
            assert torch.equal(b.target, target) and b.bad == []
    assert prepare.take_counts() == {"decoded": 20, "cpu_decoded": 0, "bad": 0, "batch_decode_failures": 0}
    assert prepare.take_counts()["decoded"] == 0


@needs_torchcodec
@pinned_pillow
def test_val_batches_match_pil(root):
    loader, prepare = torch_data.torch_val_loader(root, 4, 0, input_size=SIZE)
    assert isinstance(loader.sampler, data.ShardSampler)
    for batch, (images, target, _) in zip(loader, data.val_loader(root, 4, 0, input_size=SIZE), strict=True):
        b = prepare(batch, "cpu")
        assert torch.equal(b.target, target) and torch.equal(b.images, images)


@needs_torchcodec
def test_worker_count_does_not_change_the_batches(root):
    def batches(workers):
        loader, prepare = torch_data.torch_train_loader(root, 3, workers, seed=2, input_size=SIZE)
        loader.sampler.set_epoch(4)
        return [prepare(b, "cpu") for b in loader]

    for a, b in zip(batches(0), batches(2), strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.target, b.target)


def _jpeg_bytes(mode, seed=0, size=(64, 48), orientation=None):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    exif = Image.Exif()
    if orientation:
        exif[ExifTags.Base.Orientation] = orientation
    img.save(buf, "JPEG" if mode != "RGBA" else "PNG", exif=exif)
    return buf.getvalue()


@pytest.fixture
def odd_root(tmp_path, root):
    """Two good JPEGs beside files nvjpeg cannot take, files TorchCodec would turn (EXIF
    orientation 3: rotated 180 degrees, same shape; 6: rotated 90 degrees) and files nothing can
    decode."""
    folder = tmp_path / "train" / "c0"
    folder.mkdir(parents=True)
    for name in sorted(os.listdir(os.path.join(root, "train", "class0")))[:2]:
        shutil.copy(os.path.join(root, "train", "class0", name), folder / f"good_{name}")
    files = {
        "cmyk.JPEG": _jpeg_bytes("CMYK", 1),
        "gray.JPEG": _jpeg_bytes("L", 2),
        "png.JPEG": _jpeg_bytes("RGBA", 3),
        "rotated180.JPEG": _jpeg_bytes("RGB", 7, orientation=3),
        "rotated90.JPEG": _jpeg_bytes("RGB", 8, orientation=6),
        "truncated.JPEG": _jpeg_bytes("RGB", 4)[:-300],
        "random.JPEG": np.random.default_rng(5).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return str(tmp_path)


@needs_torchcodec
@pinned_pillow
def test_cpu_fallbacks_and_bad_files(odd_root):
    loader, prepare = torch_data.torch_train_loader(odd_root, 9, 0, input_size=SIZE)
    pil = data.image_folder(odd_root, "train", data.train_transform(SIZE))
    loader.sampler.set_epoch(0)
    (batch,), keys = list(loader), list(loader.sampler)
    b = prepare(batch, "cpu")
    bad = {os.path.basename(p): reason for p, reason in b.bad}
    assert set(bad) == {"truncated.JPEG", "random.JPEG"}
    assert "truncated" in bad["truncated.JPEG"] and "cannot identify" in bad["random.JPEG"]
    refused, _ = pil[next(k for k in keys if pil.samples[k[0]][0].endswith("truncated.JPEG"))]
    assert isinstance(refused, data.Unreadable) and "truncated" in refused.reason  # the PIL backend too
    assert prepare.take_counts() == {"decoded": 7, "cpu_decoded": 5, "bad": 2, "batch_decode_failures": 0}
    # The images kept are the PIL path's, in the sampler's order.
    good = [k for k in keys if not pil.samples[k[0]][0].endswith(("truncated.JPEG", "random.JPEG"))]
    assert torch.equal(b.images, torch.stack([pil[k][0] for k in good]))
    assert torch.equal(b.target, torch.zeros(7, dtype=torch.int64))


@needs_torchcodec
@pinned_pillow
def test_decoded_pixels_are_pillows(root, odd_root):
    """Decoding alone: every image the backend decodes on the CPU (TorchCodec's batched call for
    3-channel JPEGs without EXIF orientation, PIL for the others) has Pillow's pixels exactly."""
    for loader, prepare in (torch_data.torch_val_loader(root, 6, 0), torch_data.torch_train_loader(odd_root, 9, 0)):
        (batch,) = list(loader)
        images, reasons = prepare._decode(batch, torch.device("cpu"))
        for path, batched, image, reason in zip(batch["paths"], batch["nvjpeg"].tolist(), images, reasons):
            name = os.path.basename(path)
            assert batched == name.startswith(("good_", "img_")), name
            if name in ("truncated.JPEG", "random.JPEG"):
                assert image is None and reason
            else:
                assert torch.equal(image, torch.from_numpy(np.array(pil_loader(path))).permute(2, 0, 1)), name


@needs_torchcodec
@pytest.mark.filterwarnings("error")
def test_no_deprecated_decoder(root, odd_root):
    """The training and validation loaders, fallbacks included, with every warning an error:
    torchvision's image decoders, deprecated since torchvision 0.29, are never called."""
    if tuple(map(int, torchvision.__version__.split(".")[:2])) >= (0, 29):  # older ones do not warn
        blob = torch.frombuffer(bytearray(_jpeg_bytes("RGB")), dtype=torch.uint8)
        with pytest.raises(DeprecationWarning, match="image decoding .* of TorchVision are deprecated"):
            torchvision.io.decode_jpeg(blob)  # the filter does catch that warning
    for loader, prepare in (torch_data.torch_train_loader(odd_root, 4, 0, input_size=SIZE),
                            torch_data.torch_val_loader(root, 4, 0, input_size=SIZE)):
        for batch in loader:
            prepare(batch, "cpu")
        assert prepare.take_counts()["decoded"] > 0


@needs_torchcodec
def test_failed_batched_decode_keeps_the_good_images(tmp_path, root):
    """A JPEG whose header reads (3 channels, ends with the end-of-image marker) but has no image
    data makes the batched decode call fail: the batch is decoded image by image, the good ones
    kept, the culprit reported."""
    folder = tmp_path / "train" / "c0"
    folder.mkdir(parents=True)
    good = sorted(os.listdir(os.path.join(root, "train", "class1")))[:3]
    for name in good:
        shutil.copy(os.path.join(root, "train", "class1", name), folder / name)
    content = _jpeg_bytes("RGB", 6)
    (folder / "no_scan.JPEG").write_bytes(content[:content.index(b"\xff\xda")] + torch_data.JPEG_EOI)
    loader, prepare = torch_data.torch_train_loader(str(tmp_path), 4, 0, input_size=SIZE)
    loader.sampler.set_epoch(0)
    (batch,) = list(loader)
    assert batch["nvjpeg"].all()
    b = prepare(batch, "cpu")
    assert [os.path.basename(p) for p, _ in b.bad] == ["no_scan.JPEG"]
    assert b.images.shape[0] == 3 and torch.isfinite(b.images).all()
    assert prepare.take_counts() == {"decoded": 3, "cpu_decoded": 0, "bad": 1, "batch_decode_failures": 1}


def test_folder_errors_are_the_pil_paths(tmp_path):
    with pytest.raises(DataError, match="has no train/ folder"):
        torch_data.torch_train_loader(str(tmp_path), 2, 0)
    with pytest.raises(DataError, match="does not exist"):
        torch_data.torch_val_loader(str(tmp_path / "missing"), 2, 0)
