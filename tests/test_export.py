"""The packed 1-bit network: exact integer dot products (padding, sign(0), zero weights), logits of
the float step-2 network, the file in every checkpoint layout, and bad files refused clearly."""
import copy
import json
import os
import pickle
import random

import pytest
import torch
import torch.nn.functional as F

import evaluate
from models import reactnet_a
from models.binary import BinaryConv2d
from tests.test_checkpoint import LAYOUTS
from tests.test_model import FIXTURE, fixture_state_dict
from tests.tiny import logits, make_checkpoint, make_image_folder, max_rel_error, randomize
from utils import engine, export
from utils.checkpoint import PACKED_FORMAT, load_weights
from utils.data import val_loader
from utils.errors import CheckpointError
from utils.export import PackedBinaryConv2d, bits_to_words, load_packed, popcount, to_packed
from utils.ops import count_ops

# Largest logit difference relative to the largest |logit|, float32: the float network's own
# float32 rounding (its conv sums ~1e-7) and the folded BatchNorm's one rounding to float32.
RTOL = 1e-5


@pytest.fixture(scope="module")
def step2():
    """A step-2 model (10 classes) with random BN statistics, biases and slopes, and its float logits."""
    torch.manual_seed(0)
    model = randomize(reactnet_a(binary_weights=True, num_classes=10))
    x = torch.randn(4, 3, 32, 32)
    return model, x, logits(model, x)


def test_popcount_counts_every_bit():
    rng = random.Random(0)
    words = [0, -1, -2 ** 63, 2 ** 63 - 1, 1, 0x5555555555555555]
    words += [rng.getrandbits(64) - 2 ** 63 for _ in range(500)]
    expected = [bin(w % 2 ** 64).count("1") for w in words]
    assert popcount(torch.tensor(words)).tolist() == expected


def test_bits_to_words_layout():
    bits = torch.rand(3, 130, generator=torch.Generator().manual_seed(0)) > 0.5
    words = bits_to_words(bits)
    assert words.shape == (3, 3) and words.dtype == torch.int64
    for row in range(3):
        for i in range(192):
            bit = (int(words[row, i // 64]) >> (i % 64)) & 1
            assert bit == (int(bits[row, i]) if i < 130 else 0), (row, i)


@pytest.mark.parametrize("cin,cout,k,stride", [(32, 16, 3, 1), (96, 40, 3, 2), (64, 64, 1, 1), (130, 7, 3, 2)])
def test_packed_conv_is_the_exact_integer_dot_product(cin, cout, k, stride):
    # Exact zeros in the input (sign(0) = 0), on the borders too, and weights exactly 0.
    g = torch.Generator().manual_seed(cin)
    conv = BinaryConv2d(cin, cout, k, stride)
    with torch.no_grad():
        conv.weight.view(-1)[torch.randperm(conv.weight.numel(), generator=g)[:5]] = 0
    u = torch.randn(2, cin, 9, 7, generator=g)
    u[u.abs() < 0.6] = 0
    u[:, :, 0] = 0
    bn = randomize(torch.nn.BatchNorm2d(cout))
    packed = PackedBinaryConv2d.fold(conv, bn)
    assert len(packed.zero_weights) == 5
    packed.scale.fill_(1)
    packed.shift.zero_()
    expected = F.conv2d(torch.sign(u).double(), torch.sign(conv.weight).double(), stride=stride, padding=k // 2)
    assert torch.equal(packed(u).double(), expected)
    # The zeros matter: taken as +1 (or the zero weights as -1) the sums differ.
    assert not torch.equal(packed(torch.where(u == 0, 1.0, u)).double(), expected)
    packed.zero_weights = packed.zero_weights[:0]
    assert not torch.equal(packed(u).double(), expected)


def test_packed_conv_folds_alpha_and_batchnorm():
    g = torch.Generator().manual_seed(1)
    conv, bn = BinaryConv2d(64, 32, 3, 2).double(), randomize(torch.nn.BatchNorm2d(32)).double()
    u = torch.randn(2, 64, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        expected = bn(conv(u))
    actual = PackedBinaryConv2d.fold(conv, bn).double()(u)
    # The folded scale and shift are float32: one rounding, relative 2**-24.
    assert (actual - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_fixture_weights_give_the_float_logits():
    with open(FIXTURE) as f:
        fixture = json.load(f)
    model = reactnet_a(binary_weights=True)
    model.load_state_dict(fixture_state_dict(fixture["step2"]["state_dict_shapes"], fixture["seed"]))
    x = torch.randn(fixture["input_shape"], generator=torch.Generator().manual_seed(fixture["seed"] + 1),
                    dtype=torch.float64).float()
    expected = logits(model, x)
    actual = logits(to_packed(model), x)
    assert max_rel_error(actual, expected) < RTOL
    assert torch.equal(actual.argmax(1), expected.argmax(1))
    assert actual.argmax(1).tolist() == torch.tensor(fixture["step2"]["eval_logits"]).argmax(1).tolist()


def test_random_model_gives_the_float_logits_and_counts(step2):
    model, x, expected = step2
    counts = count_ops(model, (1, 3, 32, 32))
    packed = to_packed(copy.deepcopy(model))
    actual = logits(packed, x)
    assert max_rel_error(actual, expected) < RTOL
    assert torch.equal(actual.argmax(1), expected.argmax(1))
    assert not any(isinstance(m, (BinaryConv2d, torch.nn.BatchNorm2d)) for m in packed.feature[1:].modules())
    assert count_ops(packed, (1, 3, 32, 32)) == counts


def test_export_command(tmp_path, step2, capsys):
    model, x, expected = step2
    ckpt, out = tmp_path / "ckpt.pth.tar", tmp_path / "packed.pt"
    torch.save(LAYOUTS["this-repo"](model), ckpt)
    data = make_image_folder(tmp_path / "data", classes=10, train_per_class=0, val_per_class=1)
    export.main(["--checkpoint", str(ckpt), "--out", str(out), "--verify", data, "--input-size", "32"])
    printed = capsys.readouterr().out
    assert f"packed file      {out}: " in printed and "binary weights: 31 convs" in printed
    errors = [float(printed.split(what)[1].split()[0].strip(",);")) for what in
              ("packed vs float32 model ", "float64 model: packed ", ", float32 model ")]
    assert max(errors) < RTOL and "top-1 differs on 0 image(s)" in printed and f"{data}/val, 10 images at 32x32" in printed
    assert os.path.getsize(out) * 10 < os.path.getsize(ckpt)
    obj = torch.load(out, weights_only=True)
    assert (obj["format"], obj["version"], obj["num_classes"]) == (PACKED_FORMAT, export.VERSION, 10)
    packed = load_packed(out)
    assert not packed.training
    assert max_rel_error(logits(packed, x), expected) < RTOL
    with pytest.raises(CheckpointError, match="a packed 1-bit file"):  # e.g. as --init-checkpoint
        load_weights(reactnet_a(num_classes=10), out)


def test_export_reads_the_reactnet_release_layout(tmp_path, step2):
    # Flattened `weights` and 'module.' prefixes: the other layouts are simpler
    # (test_checkpoint.py loads each; export loads through the same load_weights).
    model, x, expected = step2
    ckpt, out = tmp_path / "release.pth.tar", tmp_path / "packed.pt"
    torch.save(LAYOUTS["reactnet-release"](model), ckpt)
    export.export(ckpt, out)
    assert max_rel_error(logits(load_packed(out), x), expected) < RTOL


def test_step1_checkpoint_is_refused(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "step1.pth.tar", step=1, num_classes=10)
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out.pt")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {str(ckpt)!r} is a step-1 checkpoint: its block convs have real-valued weights")
    assert "\n" not in err and not (tmp_path / "out.pt").exists()


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory, step2):
    path = tmp_path_factory.mktemp("packed") / "packed.pt"
    torch.save({"format": PACKED_FORMAT, "version": export.VERSION, "arch": "reactnet_a", "num_classes": 10,
                "state_dict": to_packed(copy.deepcopy(step2[0])).state_dict()}, path)
    return path


class WritesAFile:
    """Unpickling it would run os.system: a packed file must never do that."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_bad_packed_files_are_refused(tmp_path, packed_file, step2):
    obj = torch.load(packed_file, weights_only=True)
    state = obj["state_dict"]
    contents = {  # name: (what torch.save writes, what the message says)
        "version": ({**obj, "version": 3}, "packed format version 3, written by a newer version of this code, "
                                          "which reads versions 1 to 2: update the repository"),
        "float": (LAYOUTS["this-repo"](step2[0]), "is a float checkpoint (this-repo layout), not a packed"),
        "dtype": ({**obj, "state_dict": {**state, "feature.3.binary_pw.weight_bits":
                                         state["feature.3.binary_pw.weight_bits"].float()}},
                  "damaged packed file: entries that do not fit: feature.3.binary_pw.weight_bits"),
        "missing": ({**obj, "state_dict": {k: v for k, v in state.items() if k != "fc.bias"}},
                    "entries that do not fit: fc.bias"),
        "index": ({**obj, "state_dict": {**state, "feature.2.binary_3x3.zero_weights": torch.tensor([[0, 10 ** 6]])}},
                  "feature.2.binary_3x3.zero_weights (indices out of range)"),
    }
    for name, (content, _) in contents.items():
        torch.save(content, tmp_path / name)
    data = packed_file.read_bytes()
    (tmp_path / "truncated").write_bytes(data[:len(data) // 2])
    ran = tmp_path / "ran"
    (tmp_path / "executes").write_bytes(pickle.dumps({"format": PACKED_FORMAT, "x": WritesAFile(ran)}, protocol=2))
    messages = {**{name: message for name, (_, message) in contents.items()},
                "truncated": "corrupt or not a PyTorch checkpoint", "executes": "not a plain weights file"}
    for name, message in messages.items():
        path = str(tmp_path / name)
        with pytest.raises(CheckpointError) as e:
            load_packed(path)
        assert repr(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not ran.exists()


def figures(stats) -> tuple:
    """An evaluation's loss, Acc@1, Acc@5 and image count."""
    return stats.loss, stats.top1, stats.top5, stats.count


def test_evaluate_reads_a_packed_file(tmp_path, step2, packed_file, capsys, monkeypatch):
    data = make_image_folder(tmp_path / "data", classes=10, train_per_class=0, val_per_class=1)
    reads = []
    monkeypatch.setattr(torch, "load", lambda *a, load=torch.load, **k: reads.append(a[0]) or load(*a, **k))
    stats = evaluate.main(["--checkpoint", str(packed_file), "--data", data, "--batch_size", "4", "-j", "0",
                           "--input-size", "32"])
    assert reads == [str(packed_file)]  # read from disk once
    assert "packed 1-bit checkpoint, step 2 (from the checkpoint); input size 32; 10 images" in capsys.readouterr().out
    expected = engine.evaluate(step2[0], val_loader(data, 4, 0, input_size=32), engine.LoopSettings())
    assert figures(stats) == pytest.approx(figures(expected), rel=RTOL) and stats.top1 == expected.top1


def test_benchmark_command(capsys):
    export.main(["--benchmark", "--input-size", "32", "--batch-sizes", "2", "--rounds", "1", "--threads", "1",
                 "--no-compile", "--no-load"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ReActNet-A step 2, 32x32, cpu") and len(lines) == 4
    threads, batch, *ms = lines[3].split()
    assert (threads, batch) == ("1", "2") and all(float(v.rstrip("x")) > 0 for v in ms)


def test_export_refuses_an_out_that_would_overwrite_the_checkpoint_or_cannot_be_written(tmp_path, step2, capsys):
    ckpt = tmp_path / "ckpt.pth.tar"
    torch.save(LAYOUTS["this-repo"](step2[0]), ckpt)
    before = ckpt.read_bytes()
    (tmp_path / "link.pth.tar").symlink_to(ckpt)
    os.link(ckpt, tmp_path / "hard.pth.tar")
    (tmp_path / "folder").mkdir()
    for out, message in [(ckpt, "is the checkpoint itself"), (tmp_path / "link.pth.tar", "is the checkpoint itself"),
                         (tmp_path / "hard.pth.tar", "is the checkpoint itself"),
                         (tmp_path / "folder", "names a folder"), (f"{tmp_path}/folder/", "names a folder"),
                         (f"{tmp_path}/new/", "names a folder"),
                         (tmp_path / "missing" / "p.pt", f"the folder {tmp_path / 'missing'} does not exist")]:
        with pytest.raises(SystemExit) as e:
            export.main(["--checkpoint", str(ckpt), "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith(f"error: --out {out}") and message in err, err
        assert err.count("\n") == 1, err
    assert ckpt.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth.tar", "folder", "hard.pth.tar", "link.pth.tar"]
    assert os.listdir(tmp_path / "folder") == []


def test_packed_file_records_the_input_size_and_evaluates_as_its_checkpoint(tmp_path, tiny_run, capsys):
    from utils import train
    tiny = tiny_run(classes=2, train_per_class=2, val_per_class=1, step1=True)
    data = tiny.data
    train.main(["--step", "2", "--data", data, "--save", str(tmp_path / "step2"), "--init-checkpoint", tiny.step1,
                "--teacher-weights", tiny.teacher, "--epochs", "2", "--stop-after-epochs", "1", "--batch_size", "4",
                "-j", "0", "--input-size", "32"])
    best, packed = tmp_path / "step2" / "model_best.pth.tar", tmp_path / "packed.pt"
    export.main(["--checkpoint", str(best), "--out", str(packed)])
    obj = torch.load(packed, weights_only=True)
    assert (obj["version"], obj["input_size"], obj["classes"]) == (2, 32, ["class0", "class1"])
    capsys.readouterr()
    results = {}
    for path in (best, packed):  # the same command for both files
        results[path] = evaluate.main(["--checkpoint", str(path), "--data", data, "-j", "0"])
        assert "; input size 32 (from the checkpoint); 2 images" in capsys.readouterr().out
    assert figures(results[packed]) == pytest.approx(figures(results[best]), rel=RTOL)
    assert results[packed].top1 == results[best].top1
    # A version-1 file (before the input size was recorded) still loads, and evaluate says what it assumes.
    version1 = tmp_path / "version1.pt"
    torch.save({k: v for k, v in {**obj, "version": 1}.items() if k not in ("input_size", "classes")}, version1)
    load_packed(version1)
    evaluate.main(["--checkpoint", str(version1), "--data", data, "-j", "0"])
    assert ("; input size 224 (the checkpoint does not record its training size: the default; pass --input-size N)"
            in capsys.readouterr().out)
