"""Checkpoint layouts load strictly and give the source model's logits; bad files fail clearly and
safely; files are written atomically. (A run's folder: tests/test_run_folder.py.)"""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from models import reactnet_a
from models.binary import BinaryConv2d
from tests.tiny import logits
from utils.checkpoint import atomic_save, checkpoint_step, load_weights, read_checkpoint
from utils.errors import CheckpointError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "reactnet_a_seed0.json")


@pytest.fixture(scope="module")
def source():
    """A step-2 model with non-default weights and BN statistics, and its eval logits."""
    torch.manual_seed(0)
    model = reactnet_a(binary_weights=True)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith("running_var") else torch.randn_like(t) * 0.5)
    x = torch.randn(2, 3, 32, 32)
    return model.eval(), x, logits(model, x)


def with_module_prefix(state_dict):
    return {f"module.{k}": v for k, v in state_dict.items()}


def reactnet_release_state_dict(model):
    """The ReActNet release's layout: binary conv weights named `weights`, flattened to [out*in*k*k, 1]."""
    binary = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, BinaryConv2d)}
    return {(f"{k}s" if k in binary else k): (v.reshape(-1, 1) if k in binary else v)
            for k, v in model.state_dict().items()}


def released(state_dict):
    """The authors' training-script dict, saved from nn.DataParallel."""
    return {"epoch": 256, "state_dict": with_module_prefix(state_dict), "best_top1_acc": 70.5, "optimizer": {}}


LAYOUTS = {
    "this-repo": lambda m: {"epoch": 3, "step": 2, "arch": "reactnet_a", "state_dict": m.state_dict()},
    "adambnn-release": lambda m: released(m.state_dict()),
    "reactnet-release": lambda m: released(reactnet_release_state_dict(m)),
    "torchvision-reference": lambda m: {"model": m.state_dict(), "optimizer": {}, "epoch": 3},
    "state_dict": lambda m: m.state_dict(),
    "state_dict-module": lambda m: with_module_prefix(m.state_dict()),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_loads_and_gives_source_logits(tmp_path, source, layout):
    model, x, expected = source
    path = tmp_path / "checkpoint.pth.tar"
    # The ReActNet release was written by PyTorch 1.4, in the legacy (non-zip) serialization.
    torch.save(LAYOUTS[layout](model), path, _use_new_zipfile_serialization=layout != "reactnet-release")
    fresh = reactnet_a(binary_weights=True)
    assert load_weights(fresh, path) == layout.removesuffix("-module")
    assert torch.equal(logits(fresh, x), expected)


def test_the_teacher_loads_through_the_same_layouts(tmp_path):
    import torchvision

    from utils.distill import build_teacher
    torch.manual_seed(0)
    state_dict = torchvision.models.resnet18(num_classes=3).state_dict()
    layouts = {"state_dict-module": with_module_prefix(state_dict), "torchvision-reference": {"model": state_dict},
               "adambnn-release": released(state_dict)}
    for layout, obj in layouts.items():
        torch.save(obj, tmp_path / layout)
        teacher = build_teacher("resnet18", str(tmp_path / layout), 3, log=lambda line: None)
        assert all(torch.equal(v, state_dict[k]) for k, v in teacher.state_dict().items()), layout


def test_reactnet_release_layout_is_the_fixtures():
    with open(FIXTURE) as f:
        expected = json.load(f)["reactnet_checkpoint_shapes"]
    layout = reactnet_release_state_dict(reactnet_a())
    assert {k: list(v.shape) for k, v in layout.items()} == expected


def test_step1_checkpoint_loads_into_step2(source):
    model, x, _ = source
    step1 = reactnet_a(binary_weights=False)
    step1.load_state_dict(model.state_dict())
    checkpoint = {"epoch": 256, "step": 1, "state_dict": step1.state_dict()}
    step2 = reactnet_a(binary_weights=True)
    assert checkpoint_step(checkpoint) == 1
    assert load_weights(step2, checkpoint) == "this-repo"
    assert torch.equal(logits(step2, x), source[2])


def test_checkpoint_step():
    assert checkpoint_step({"step": 2, "state_dict": {}}) == 2
    assert checkpoint_step(released({})) is None
    assert checkpoint_step({"a": torch.zeros(1)}) is None


def test_wrong_number_of_classes_is_refused_without_loading():
    model = reactnet_a()
    before = model.fc.weight.clone()
    with pytest.raises(CheckpointError) as e:
        load_weights(model, reactnet_a(num_classes=10).state_dict())
    message = str(e.value)
    assert message.startswith("state_dict checkpoint does not fit ReActNetA")
    assert "wrong shapes: fc.weight [10, 1024] (model [1000, 1024]), fc.bias [10] (model [1000])" in message
    assert torch.equal(model.fc.weight, before)


def test_missing_and_unexpected_keys_are_named():
    model = reactnet_a()
    checkpoint = released(model.state_dict())
    del checkpoint["state_dict"]["module.feature.3.bn1.running_var"]
    checkpoint["state_dict"]["module.feature.3.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_weights(model, checkpoint)
    assert str(e.value) == ("adambnn-release checkpoint does not fit ReActNetA: missing keys: "
                            "feature.3.bn1.running_var; unexpected keys: feature.3.extra.weight")


def test_many_missing_keys_are_cut_short():
    state_dict = reactnet_a().state_dict()
    with pytest.raises(CheckpointError, match=r"missing keys: feature\.0\.conv1\.weight, .* \(\+\d+ more\)"):
        load_weights(reactnet_a(), {"fc.weight": state_dict["fc.weight"], "fc.bias": state_dict["fc.bias"]})


def test_not_a_checkpoint():
    with pytest.raises(CheckpointError, match="expected a dict, got list"):
        load_weights(reactnet_a(), [1, 2])
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout.*top-level keys: epoch, model"):
        load_weights(reactnet_a(), {"epoch": 1, "model": {}})


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        read_checkpoint(tmp_path / "nope.pth")


@pytest.mark.parametrize("zip_format", [True, False])
def test_truncated_file(tmp_path, zip_format):
    path = tmp_path / "truncated.pth"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, path, _use_new_zipfile_serialization=zip_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch checkpoint"):
        read_checkpoint(path)


@pytest.mark.parametrize("size", [0, 7, 5000])
def test_random_bytes_are_called_corrupt_and_never_advised_unsafe_loading(tmp_path, size):
    path = tmp_path / "random.pth.tar"
    path.write_bytes(np.random.default_rng(size).bytes(size))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert "corrupt" in str(e.value) and str(path) in str(e.value)
    assert "weights_only=False" not in str(e.value) and "trust" not in str(e.value)


def test_stale_temporaries_are_removed(tmp_path):
    from utils.checkpoint import remove_stale_temporaries
    for name in ("checkpoint.pth.tar.123.tmp", "model_best.pth.tar.9.tmp", "notes.tmp", "checkpoint.pth.tar"):
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == ["checkpoint.pth.tar.123.tmp", "model_best.pth.tar.9.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth.tar", "notes.tmp"]
    assert remove_stale_temporaries(tmp_path / "absent") == []


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, zip_format):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": reactnet_a().state_dict(), "extra": Payload(marker)}, path,
               _use_new_zipfile_serialization=zip_format)
    model = reactnet_a()
    with pytest.raises(CheckpointError) as e:
        load_weights(model, path)
    assert "not a plain weights file" in str(e.value) and "nothing in it was executed" in str(e.value)
    assert "system" in str(e.value)
    assert not marker.exists()
    # Control: the payload is real, and an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_atomic_save_writes_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    atomic_save({"a": torch.arange(3)}, path)
    atomic_save({"a": torch.arange(4)}, path)
    assert torch.equal(read_checkpoint(path)["a"], torch.arange(4))
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]


class FailsToPickle:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_atomic_save_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth.tar"
    atomic_save({"a": torch.arange(3)}, path)
    old = path.read_bytes()
    # Fails mid-write: the tensor data is already written when the second entry fails to pickle.
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"a": torch.zeros(100_000), "b": FailsToPickle()}, path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["checkpoint.pth.tar"]
    # Fails after the write, before the rename.
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("I/O error (simulated)")))
    with pytest.raises(OSError, match="I/O error"):
        atomic_save({"a": torch.zeros(10)}, path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["checkpoint.pth.tar"]


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs: a disk that really fills (needs root; skipped where it cannot be mounted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                                   capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_one_line_naming_the_folder_and_the_bytes_and_keeps_the_old_file(small_disk):
    path = small_disk / "checkpoint.pth.tar"
    atomic_save({"w": torch.zeros(1000)}, path)
    old = path.read_bytes()
    with pytest.raises(CheckpointError) as e:
        atomic_save({"w": torch.zeros(500_000)}, path)  # 2 MB
    assert str(e.value).startswith(f"no space left in {small_disk} to write checkpoint.pth.tar (about 2.0 MB "
                                   "needed, 1.0 MB free): free space there")
    assert path.read_bytes() == old and os.listdir(small_disk) == ["checkpoint.pth.tar"]
