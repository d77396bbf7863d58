"""The published recipe (README, "The original release"): defaults, LR schedule, weight-decay groups, loss, Lighting."""
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from models import reactnet_a
from utils import recipe
from utils.data import IMAGENET_PCA_EIGVAL, IMAGENET_PCA_EIGVEC, Lighting, train_transform, val_transform
from utils.distill import DistributionLoss
from utils.engine import train_step
from utils.config import get_parser, resolve_args


def parse(*argv):
    return resolve_args(get_parser().parse_args(["--data", "somewhere", *argv]))


def test_defaults_are_the_published_recipe():
    a1, a2 = parse("--step", "1"), parse("--step", "2")
    for a in (a1, a2):
        assert (a.learning_rate, a.epochs, a.batch_size, a.teacher, a.optimizer, a.input_size) == \
            (1.25e-3, 256, 256, "resnet34", "adam", 224)
    assert (a1.weight_decay, a2.weight_decay) == (5e-6, 0.0)
    assert a1.save == os.path.join(recipe.ROOT, "step1", "output")
    assert a2.save == os.path.join(recipe.ROOT, "step2", "output")
    assert a2.init_checkpoint == os.path.join(recipe.ROOT, "step1", "output", "model_best.pth.tar")
    assert parse("--step", "1", "--optimizer", "sgd").learning_rate == 0.1
    assert parse("--step", "1", "--optimizer", "sgd", "--learning_rate", "0.5").learning_rate == 0.5


def test_data_from_environment(monkeypatch):
    monkeypatch.setenv("DATA", "/imagenet")
    assert resolve_args(get_parser().parse_args(["--step", "1"])).data == "/imagenet"


@pytest.mark.parametrize("epochs", [1, 4, 256])
def test_lr_schedule_epoch_e_trains_at_lr_times_1_minus_e_plus_1_over_epochs(epochs):
    model = torch.nn.Linear(2, 2)
    opt = recipe.build_optimizer(model, "adam", 1.25e-3, 0.0)
    sched = recipe.build_scheduler(opt, 1.25e-3, epochs)
    # The original: LambdaLR(lambda step: 1 - step / epochs), stepped at the start of each epoch.
    ref_opt = torch.optim.Adam(model.parameters(), lr=1.25e-3)
    ref = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda step: 1.0 - step / epochs)
    for e in range(epochs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref.step()
        lr = opt.param_groups[0]["lr"]
        assert lr == pytest.approx(1.25e-3 * (1 - (e + 1) / epochs), abs=1e-15)
        assert lr == pytest.approx(ref_opt.param_groups[0]["lr"], abs=1e-15)
        assert all(g["lr"] == lr for g in opt.param_groups)
        opt.step()
        sched.step()  # at the end of the epoch
    assert opt.param_groups[0]["lr"] == pytest.approx(1.25e-3 * (1 - (epochs + 1) / epochs))


def test_weight_decay_groups_match_the_original():
    model = reactnet_a(binary_weights=True)
    opt = recipe.build_optimizer(model, "adam", 1.25e-3, 5e-6)
    names = {id(p): n for n, p in model.named_parameters()}
    other, decay = ([names[id(p)] for p in g["params"]] for g in opt.param_groups)
    # Order as in the original: [other parameters, weight parameters], each in model order.
    assert [n for n, _ in model.named_parameters() if n in other] == other
    assert [n for n, _ in model.named_parameters() if n in decay] == decay
    assert len(decay) + len(other) == len(list(model.parameters()))
    conv = [n for n in decay if not n.split(".")[-2].startswith("move")]
    move = [n for n in decay if n.split(".")[-2].startswith("move")]
    assert len(conv) == 32 and all(n.endswith(".weight") for n in conv)
    assert "feature.0.conv1.weight" in conv
    assert len(move) == 78 and all(n.endswith(".bias") for n in move)
    assert all(("bn" in n or "prelu" in n or n.startswith("fc.")) for n in other)
    assert {"fc.weight", "fc.bias"} <= set(other)
    g0, g1 = opt.param_groups
    assert g0["weight_decay"] == 0 and g1["weight_decay"] == 5e-6
    assert g0["betas"] == g1["betas"] == (0.9, 0.999) and g0["eps"] == 1e-8 and g0["lr"] == 1.25e-3


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("wd", [0.0, 5e-6, -1e-4])
def test_optimizers_accept_any_weight_decay(name, wd):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    opt = recipe.build_optimizer(model, name, 0.1, wd)
    w0 = model[0].weight.detach().clone()
    model[0].weight.grad = torch.zeros_like(w0)
    model[1].weight.grad = torch.zeros_like(model[1].weight)
    opt.step()
    if name == "sgd":
        assert opt.param_groups[1]["momentum"] == 0.9
        expected = w0 - 0.1 * wd * w0  # coupled: grad + wd * w
    elif name == "adam":  # coupled L2: the decay goes through Adam's normalisation
        g = wd * w0
        expected = w0 - 0.1 * g / (g.abs() + 1e-8) if wd else w0
    else:  # decoupled
        expected = w0 * (1 - 0.1 * wd)
    torch.testing.assert_close(model[0].weight.detach(), expected)
    assert torch.equal(model[1].weight.detach(), torch.ones(2))  # no decay on BN


def test_distribution_loss_is_the_originals():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7)
    # The original: -bmm(softmax(t).unsqueeze(1), log_softmax(s).unsqueeze(2)).mean()
    ref = -torch.bmm(F.softmax(t, 1).unsqueeze(1), F.log_softmax(s, 1).unsqueeze(2)).mean()
    torch.testing.assert_close(DistributionLoss()(s, t), ref)
    with pytest.raises(ValueError):
        DistributionLoss()(s, t.requires_grad_())


def original_lighting(img, alpha):
    """The original's Lighting.__call__ with its numpy draw replaced by `alpha`."""
    rnd = alpha.astype("float32")
    old_dtype = np.asarray(img).dtype
    v = (rnd * IMAGENET_PCA_EIGVAL).reshape((3, 1))
    inc = np.dot(IMAGENET_PCA_EIGVEC, v).reshape((3,))
    img = np.add(img, inc)
    if old_dtype == np.uint8:
        img = np.clip(img, 0, 255)
    return Image.fromarray(img.astype(old_dtype), "RGB")


def test_lighting_matches_the_original():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8))
    img.putpixel((0, 0), (255, 255, 255))
    img.putpixel((1, 0), (0, 0, 0))
    for std in (0.1, 50.0):  # 50: big enough to move and clip pixels
        torch.manual_seed(3)
        out = Lighting(std)(img)
        torch.manual_seed(3)
        alpha = torch.randn(3).numpy() * np.float32(std)
        assert np.array_equal(np.asarray(out), np.asarray(original_lighting(img, alpha)))
    assert not np.array_equal(np.asarray(out), np.asarray(img))
    assert Lighting(0)(img) is img


def test_transforms_are_the_originals():
    t = train_transform().transforms
    assert [type(x) for x in t] == [transforms.RandomResizedCrop, Lighting, transforms.RandomHorizontalFlip,
                                    transforms.ToTensor, transforms.Normalize]
    assert t[0].size == (224, 224) and t[0].scale == (0.08, 1.0) and t[1].alphastd == 0.1
    v = val_transform().transforms
    assert [type(x) for x in v] == [transforms.Resize, transforms.CenterCrop, transforms.ToTensor,
                                    transforms.Normalize]
    assert v[0].size == 256 and v[1].size == (224, 224)
    assert tuple(v[3].mean) == (0.485, 0.456, 0.406) and tuple(v[3].std) == (0.229, 0.224, 0.225)


def test_train_step_order_and_frozen_teacher():
    calls = []

    class Monitor:
        def before_step(self):
            calls.append(("before", student.weight.grad is not None, student.weight.clone()))

        def after_step(self):
            calls.append(("after", None, student.weight.clone()))

    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3).requires_grad_(False)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    w0 = student.weight.detach().clone()
    loss, logits = train_step(student, teacher, torch.randn(2, 4), DistributionLoss(), opt, monitor=Monitor())
    assert [c[0] for c in calls] == ["before", "after"] and calls[0][1]
    assert torch.equal(calls[0][2], w0) and not torch.equal(calls[1][2], w0)
    assert student.weight.grad is None and not loss.requires_grad and logits.shape == (2, 3)


def test_train_step_bf16_and_channels_last():
    torch.manual_seed(0)
    student = reactnet_a(binary_weights=True, num_classes=3).to(memory_format=torch.channels_last)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    teacher.requires_grad_(False).to(memory_format=torch.channels_last)
    opt = recipe.build_optimizer(student, "adam", 1e-3, 0.0)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    loss, logits = train_step(student, teacher, x, DistributionLoss(), opt, precision="bf16")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert logits.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in student.parameters())


def test_fast_decode_is_opt_in(tmp_path):
    from utils.data import draft_loader, train_loader
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(np.zeros((1000, 800, 3), np.uint8)).save(tmp_path / split / "a" / "x.jpg")
    img = draft_loader(str(tmp_path / "train" / "a" / "x.jpg"), 224)
    assert img.size == (400, 500) and img.mode == "RGB"  # 1/2 scale: 1/4 would be under 224
    assert train_loader(str(tmp_path), 1, 0).dataset.loader.__name__ == "default_loader"
    fast = train_loader(str(tmp_path), 1, 0, input_size=224, fast_decode=True)
    assert fast.dataset.loader.func is draft_loader
    assert next(iter(fast))[0].shape == (1, 3, 224, 224)
