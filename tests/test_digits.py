"""utils/demo/digits.py: the embedded demo data (export) and its teacher."""
import os
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from utils.errors import UserError
from utils.demo import digits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "data"
    assert digits.export(str(out), verbose=False) is True
    return out


def test_export_layout_counts_and_classes(exported):
    from sklearn.datasets import load_digits
    per_class = np.bincount(load_digits().target)
    assert sorted(os.listdir(exported)) == [digits.MANIFEST, "train", "val"]
    names = {}
    for split in ("train", "val"):
        assert sorted(os.listdir(exported / split)) == digits.CLASSES
        names[split] = {c: set(os.listdir(exported / split / c)) for c in digits.CLASSES}
    assert sum(len(v) for v in names["train"].values()) == 1437
    assert sum(len(v) for v in names["val"].values()) == 360
    for c in digits.CLASSES:
        train, val = names["train"][c], names["val"][c]
        assert not train & val  # disjoint split
        assert len(train) + len(val) == per_class[int(c)]
        assert abs(len(val) / per_class[int(c)] - 0.2) < 0.02  # stratified
    image = Image.open(exported / "val" / "3" / sorted(names["val"]["3"])[0])
    assert image.size == (32, 32) and image.mode == "RGB"
    ds = torchvision.datasets.ImageFolder(str(exported / "train"))
    assert ds.classes == digits.CLASSES and len(ds) == 1437


def test_export_is_idempotent_and_refuses_foreign_folders(exported, tmp_path):
    some = exported / "train" / "0" / sorted(os.listdir(exported / "train" / "0"))[0]
    mtime = os.stat(some).st_mtime_ns
    assert digits.export(str(exported), verbose=False) is False  # complete: left as it is
    assert os.stat(some).st_mtime_ns == mtime
    with pytest.raises(UserError, match="not a complete digits export"):
        digits.export(str(exported), size=16, verbose=False)  # other settings: not overwritten
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a complete digits export"):
        digits.export(str(foreign), verbose=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_teacher_writes_a_state_dict_the_trainer_accepts(exported, tmp_path):
    small = tmp_path / "small"  # 2 train and 1 val image per class
    for split, n in (("train", 2), ("val", 1)):
        for c in digits.CLASSES:
            os.makedirs(small / split / c)
            for name in sorted(os.listdir(exported / split / c))[:n]:
                shutil.copy(exported / split / c / name, small / split / c / name)
    out = tmp_path / "teacher" / "resnet34.pth"
    metrics = digits.train_teacher(str(small), str(out), epochs=1, batch_size=10, workers=0,
                                   verbose=False)
    assert metrics.count == 10 and 0 <= metrics.top1 <= 100
    state = torch.load(out, weights_only=True)
    torchvision.models.resnet34(num_classes=10).load_state_dict(state, strict=True)
    from utils.distill import build_teacher
    teacher = build_teacher("resnet34", str(out), 10, log=lambda s: None)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
