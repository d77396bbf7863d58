"""utils/analysis: each measurement on hand-made tensors with a known answer, the monitor on
ReActNet-A for two iterations, the loss-landscape grid, and the findings table."""
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from models import reactnet_a
from models.binary import BinaryConv2d
from utils.analysis import TrainingMonitor
from utils.analysis import findings, landscape
from utils.analysis.monitor import (dead_fraction, effective_step, latent_gt1_fraction, live_taps,
                                    saturation_fraction, sign_change_fraction, sign_flip_fraction)


class TwoConvs(nn.Module):
    """Two binary convs on a 4x4 input: every tap of the 3x3 conv sees real pixels."""

    def __init__(self, binary_weights=True):
        super().__init__()
        self.a = BinaryConv2d(2, 3, 3, 1, binary_weights)
        self.b = BinaryConv2d(3, 4, 1, 1, binary_weights)

    def forward(self, x):
        return self.b(self.a(x)).mean(dim=(2, 3))


def _flip(w, k, gen):
    """A copy of w (no zeros) with the sign of exactly k entries flipped."""
    idx = torch.randperm(w.numel(), generator=gen)[:k]
    out = w.clone().view(-1)
    out[idx] = -out[idx]
    return out.view_as(w), idx


# -- the metrics on hand-made tensors --------------------------------------------------------

def test_ff_is_k_over_n():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 4, 3, 3, generator=gen)
    for k in (0, 1, 17, w.numel()):
        flipped, _ = _flip(w, k, gen)
        assert sign_flip_fraction(w, flipped) == pytest.approx(k / w.numel())
    # only the sign matters: rescaling the weights flips nothing
    assert sign_flip_fraction(w, 3 * w) == 0.0


def test_c2i_counts_sign_changes_from_the_reference():
    gen = torch.Generator().manual_seed(1)
    ref = torch.randn(1000, generator=gen)
    current, _ = _flip(ref * 0.5, 123, gen)
    assert sign_change_fraction(ref, current) == pytest.approx(0.123)


def test_saturation_dead_and_latent_fractions():
    u = torch.tensor([0.0, 0.5, -0.99, 1.0, -1.0, 3.0, -2.5, 0.999])
    assert saturation_fraction(u) == pytest.approx(4 / 8)  # |u| >= 1: 1, -1, 3, -2.5
    g = torch.tensor([0.0, 1e-3, 0.0, -2.0, 0.0, 1e-13, 5.0, -1e-20])
    assert dead_fraction(g) == pytest.approx(5 / 8)  # three zeros, 1e-13, -1e-20
    w = torch.tensor([0.5, -1.5, 1.0, -1.0, 2.0, 0.0, -0.1, 1.0001])
    assert latent_gt1_fraction(w) == pytest.approx(3 / 8)  # -1.5, 2, 1.0001 (|W| = 1 is not > 1)


def test_live_taps():
    # 3x3, stride 1, pad 1 on a 1x1 map: only the centre tap sees the pixel
    assert live_taps(3, 1, 1, (1, 1)).tolist() == [[False] * 3, [False, True, False], [False] * 3]
    # stride 2 on a 2x2 map (output 1x1): the taps reading row/column -1 see only padding
    assert live_taps(3, 2, 1, (2, 2)).tolist() == [[False] * 3, [False, True, True], [False, True, True]]
    assert live_taps(3, 1, 1, (2, 2)) is None
    assert live_taps(3, 2, 1, (4, 4)) is None
    assert live_taps(1, 1, 0, (1, 1)) is None


@pytest.mark.parametrize("kind", ["adam", "adam-l2", "amsgrad", "adamw", "sgd"])
def test_effective_step_matches_the_optimizers_update(kind):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(40, dtype=torch.float64))  # float64: exact comparison
    opt = {
        "adam": lambda: torch.optim.Adam([p], lr=1e-2),
        "adam-l2": lambda: torch.optim.Adam([p], lr=1e-2, weight_decay=0.1),
        "amsgrad": lambda: torch.optim.Adam([p], lr=1e-2, amsgrad=True),
        "adamw": lambda: torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1),
        "sgd": lambda: torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01),
    }[kind]()
    for t in range(5):
        p.grad = torch.randn(40, dtype=torch.float64) * (0.1 if t % 2 else 3.0)
        if t >= 2:
            p.grad[:5] = 0  # dead gradients now: the moments still move these weights
        before = p.detach().clone()
        opt.step()
        change = p.detach() - before
        step = effective_step(opt, p)
        if kind == "adamw":  # the decoupled shrink is not part of the adaptive step
            change = change + 1e-2 * 0.1 * before
        torch.testing.assert_close(step, change, rtol=1e-9, atol=1e-12)
    assert step[:5].abs().min() > 0  # Adam and momentum keep moving zero-gradient weights


# -- the monitor -----------------------------------------------------------------------------

def _iteration(model, opt, mon, it, x, edit=None):
    mon.start_iteration(it)
    model(x).square().sum().backward()
    mon.before_step()
    if edit is None:
        opt.step()
    else:
        edit()
    mon.after_step()
    opt.zero_grad(set_to_none=True)


def test_monitor_ff_c2i_and_saturation_on_known_tensors():
    torch.manual_seed(0)
    model = TwoConvs()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # a real step that changes nothing
    mon = TrainingMonitor(model, opt, every=1)
    n_a, n_b = model.a.weight.numel(), model.b.weight.numel()
    gen = torch.Generator().manual_seed(3)

    def flip():  # the "optimizer step": exactly 7 sign flips in a, 2 in b
        with torch.no_grad():
            model.a.weight.copy_(_flip(model.a.weight, 7, gen)[0])
            model.b.weight.copy_(_flip(model.b.weight, 2, gen)[0])

    # the input of conv a: |u| >= 1 for exactly half of the values
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 0.25]).repeat(4).view(1, 2, 4, 4)
    _iteration(model, opt, mon, 0, x, edit=flip)
    _iteration(model, opt, mon, 1, x)
    _iteration(model, opt, mon, 2, x)
    m = mon.epoch_metrics()
    assert m["measured_iterations"] == 3
    assert m["ff/a"] == pytest.approx(7 / n_a / 3)  # averaged over the 3 measured steps
    assert m["ff/b"] == pytest.approx(2 / n_b / 3)
    assert m["ff"] == pytest.approx(9 / (n_a + n_b) / 3)
    assert m["c2i/a"] == pytest.approx(7 / n_a)
    assert m["c2i"] == pytest.approx(9 / (n_a + n_b))
    assert m["saturation/a"] == pytest.approx(0.5)
    assert m["latent_gt1"] == 0.0 and m["padding_only"] == 0.0
    # the next epoch starts from zero; C2I still refers to the initial weights
    m2 = mon.epoch_metrics()
    assert "ff" not in m2 and m2["measured_iterations"] == 0 and m2["c2i"] == m["c2i"]
    with torch.no_grad():
        model.a.weight[0, 0, 0, 0] = 1.5
        model.a.weight[1, 0, 0, 0] = -2.0
    assert mon.epoch_metrics()["latent_gt1/a"] == pytest.approx(2 / n_a)
    mon.close()


def test_monitor_measures_only_every_n_and_not_in_eval():
    torch.manual_seed(0)
    model = TwoConvs()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mon = TrainingMonitor(model, opt, every=3)
    x = torch.randn(2, 2, 4, 4) * 2
    for it in range(7):  # 0, 3, 6 are measured
        _iteration(model, opt, mon, it, x)
    model.eval()
    mon.start_iteration(9)
    with torch.no_grad():
        model(torch.full((1, 2, 4, 4), 5.0))  # an eval forward is not counted
    mon.after_step()
    model.train()
    m = mon.epoch_metrics()
    assert m["measured_iterations"] == 3
    with torch.no_grad():
        u_b = model.a(x)
    expected = (saturation_fraction(x) * x.numel() + saturation_fraction(u_b) * u_b.numel()) / (
        x.numel() + u_b.numel())
    assert m["saturation"] == pytest.approx(expected)
    assert m["saturation/b"] == pytest.approx(saturation_fraction(u_b))
    mon.close()
    with pytest.raises(ValueError):
        TrainingMonitor(model, opt, every=0)


def test_monitor_reference_and_dead_with_known_gradients():
    torch.manual_seed(0)
    model = TwoConvs()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the model now differs from the reference in 11 signs of a
        model.a.weight.copy_(_flip(model.a.weight, 11, gen)[0])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = TrainingMonitor(model, opt, every=1, reference=ref)
    mon.start_iteration(0)
    model(torch.randn(2, 2, 4, 4)).sum().backward()
    g = torch.randn_like(model.a.weight)
    g.view(-1)[:13] = 0.0
    model.a.weight.grad = g
    model.b.weight.grad = torch.ones_like(model.b.weight)
    mon.before_step()
    opt.step()
    mon.after_step()
    m = mon.epoch_metrics()
    n_a, n_b = model.a.weight.numel(), model.b.weight.numel()
    assert m["dead/a"] == pytest.approx(13 / n_a)
    assert m["dead"] == pytest.approx(13 / (n_a + n_b))
    # first Adam step: |step| = lr wherever g != 0 and 0 where g == 0 (m = v = 0)
    assert m["step_abs_mean"] == pytest.approx(1e-3 * (n_a + n_b - 13) / (n_a + n_b), rel=1e-4)
    assert m["dead_revived"] == 0.0
    assert m["c2i/a"] >= 11 / n_a - 1e-9  # 11 flips vs the reference, plus what the step did
    with pytest.raises(KeyError):
        TrainingMonitor(model, opt, every=1, reference={"x": torch.zeros(1)})
    mon.close()


def test_monitor_on_reactnet_a_at_32x32():
    torch.manual_seed(0)
    model = reactnet_a(binary_weights=True, num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = TrainingMonitor(model, opt, every=2)
    x = torch.randn(2, 3, 32, 32)
    for it in range(2):
        mon.start_iteration(it)
        nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
        mon.before_step()
        opt.step()
        mon.after_step()
        opt.zero_grad(set_to_none=True)
    m = mon.epoch_metrics()
    assert m["measured_iterations"] == 1
    names = [n for n, mod in model.named_modules() if isinstance(mod, BinaryConv2d)]
    assert len(names) == 31
    for key in ("ff", "c2i", "saturation", "dead", "latent_gt1"):
        assert 0.0 <= m[key] <= 1.0, key
        assert all(0.0 <= m[f"{key}/{n}"] <= 1.0 for n in names), key
    assert 0 < m["ff"] < 0.5 and 0 < m["saturation"] < 1
    for key in ("step_abs_mean", "grad_abs_mean", "weak_step_ratio", "step_abs_p50"):
        assert m[key] > 0, key
    assert m["c2i"] > 0  # two steps (one of them measured) from the initial weights
    assert 0.3 < m["padding_only"] < 0.4  # the 1x1-map stage's 3x3 border taps at 32x32
    assert all(isinstance(v, float) for v in m.values())
    json.dumps(m)
    mon.close()
    assert not any(mod._forward_pre_hooks for mod in model.modules())  # no hooks left
    assert mon.epoch_metrics() == {}


# -- the loss landscape ----------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def test_filter_normalized_direction():
    torch.manual_seed(0)
    model = Tiny()
    d = landscape.filter_normalized_direction(model, torch.Generator().manual_seed(0))
    for name in ("conv.bias", "bn.weight", "bn.bias", "fc.bias"):
        assert d[name].abs().sum() == 0, name
    for name in ("conv.weight", "fc.weight"):
        w = dict(model.named_parameters())[name]
        dims = tuple(range(1, w.dim()))
        norm = torch.linalg.vector_norm
        torch.testing.assert_close(norm(d[name], dim=dims), norm(w.detach(), dim=dims))


def test_loss_surface_grid():
    torch.manual_seed(0)
    model = Tiny()
    model.bn.running_var.fill_(2.0)
    images, labels = torch.randn(10, 3, 6, 6), torch.randint(0, 3, (10,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = landscape.loss_surface(model, images, labels, grid=3, span=0.5, batch_size=4)
    assert res["loss"].shape == (3, 3) and res["acc"].shape == (3, 3)
    np.testing.assert_allclose(res["a"], [-0.5, 0.0, 0.5])
    with torch.no_grad():
        center = nn.functional.cross_entropy(model.eval()(images), labels).item()
    assert res["loss"][1, 1] == pytest.approx(center, rel=1e-5)
    assert len(np.unique(np.round(res["loss"], 6))) > 1  # the directions do move the loss
    for k, v in model.state_dict().items():  # weights restored
        torch.testing.assert_close(v, before[k])


def test_surface_stats():
    x = np.linspace(-1, 1, 7)
    bowl = np.add.outer(x ** 2, x ** 2)
    assert landscape.surface_stats(bowl)["local_minima"] == 1
    assert landscape.surface_stats(np.add.outer(x, x))["roughness"] == pytest.approx(0.0, abs=1e-12)
    egg = bowl + 0.3 * np.cos(9 * np.add.outer(x, 0 * x)) * np.cos(9 * np.add.outer(0 * x, x))
    assert landscape.surface_stats(egg)["roughness"] > landscape.surface_stats(bowl)["roughness"]


@pytest.mark.parametrize("plot", [False, True])
def test_landscape_command_writes_the_grid_with_or_without_matplotlib(tmp_path, plot, monkeypatch, capsys):
    from tests.tiny import make_image_folder
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where it is not installed
    data = make_image_folder(tmp_path / "data", classes=3, train_per_class=2, val_per_class=1)
    torch.manual_seed(0)
    model = reactnet_a(binary_weights=False, num_classes=3)
    ckpt = tmp_path / "ckpt.pth.tar"
    torch.save({"epoch": 1, "step": 1, "arch": "reactnet_a", "state_dict": model.state_dict(),
                "best_top1_acc": 0.0, "args": {"input_size": 32}}, ckpt)
    out = tmp_path / "land"
    landscape.main(["--checkpoint", str(ckpt), "--data", data, "--grid", "2", "--subset", "4",
                    "--out", str(out)] + ([] if plot else ["--no-plot"]))
    said = capsys.readouterr().out.splitlines()[-1]
    assert said == "landscape: matplotlib is not installed: no plot (pip install matplotlib)" if plot else \
        said.startswith(f"landscape: wrote {out}.npz")
    res = np.load(str(out) + ".npz")
    assert res["loss"].shape == (2, 2) and np.isfinite(res["loss"]).all()
    settings = json.loads(str(res["settings"]))
    assert settings["step"] == 1 and settings["subset"] == 4 and settings["input_size"] == 32


# -- the findings table ----------------------------------------------------------------------

def test_findings_table_from_json_lines(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    lines = [
        {"epoch": 0, "val_top1": 50.0, "best_top1": 50.0, "ff": 0.02, "c2i": 0.1,
         "saturation": 0.4, "dead": 0.01, "weak_step_ratio": 0.5, "latent_gt1": 0.0,
         "epoch_time": 10.0, "ff/feature.1.binary_3x3": 0.02},
        {"epoch": 1, "val_top1": 70.0, "best_top1": 70.0, "ff": 0.04, "c2i": 0.2,
         "saturation": 0.2, "dead": 0.03, "weak_step_ratio": 0.7, "latent_gt1": 0.001,
         "epoch_time": 12.0},
        {"epoch": 1, "val_top1": 80.0, "best_top1": 80.0, "ff": 0.04, "c2i": 0.25,
         "saturation": 0.2, "dead": 0.03, "weak_step_ratio": 0.7, "latent_gt1": 0.001,
         "epoch_time": 12.0},  # epoch 1 again (after a resume): the last line counts
    ]
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    records = findings.read_log(str(log))
    assert [r["epoch"] for r in records] == [0, 1]
    run = {"name": "s1-adam", "step": 1, "optimizer": "adam", "weight_decay": 5e-6}
    row = findings.summarize(run, records)
    assert row["final_top1"] == 80.0 and row["best_top1"] == 80.0 and row["epochs"] == 2
    assert row["ff"] == pytest.approx(0.03) and row["c2i"] == 0.25
    assert row["saturation"] == pytest.approx(0.3) and row["dead"] == pytest.approx(0.02)
    assert row["train_time"] == pytest.approx(22.0)
    sgd = findings.summarize({"name": "s1-sgd", "step": 1, "optimizer": "sgd",
                              "weight_decay": 0.0}, [{"epoch": 0, "val_top1": 10.0}])
    table = findings.results_table([row, sgd])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| run | step | optimizer | lr | weight decay")
    assert ("| s1-adam | 1 | adam | 0.00125 | 5e-06 | 2 | 80.00 | 80.00 | 3.00% | 25.00% | 30.00% "
            "| 2.00% |") in table
    assert "| s1-sgd | 1 | sgd | 0.1 | 0 | 1 | n/a | 10.00 | n/a |" in table
    # a run whose loss became NaN keeps its accuracy, loses its measurements, gets a note
    nan = float("nan")
    bad = findings.summarize({"name": "s2-sgd", "step": 2, "optimizer": "sgd", "weight_decay": 0.0},
                             [{"epoch": 0, "val_top1": 9.7, "best_top1": 9.7, "val_loss": nan,
                               "train_loss": nan, "ff": 0.5, "c2i": 0.5}])
    assert bad["ff"] is None and bad["c2i"] is None and bad["final_top1"] == 9.7
    assert "| n/a | n/a |" in findings.results_table([bad])
    assert findings.results_table([bad]).endswith("diverged: NaN loss in epoch 1 |")
    path = findings.write_results(str(tmp_path / "out"), [row, sgd], {"seed": 0}, [])
    text = open(path).read()
    assert table in text
    assert json.load(open(os.path.join(tmp_path, "out", "results.json")))["rows"][0]["run"] == "s1-adam"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where it is not installed: no plots, said by main()
    for plot in (findings.plot_runs, findings.plot_layers):
        assert not plot([run], {"s1-adam": records}, str(tmp_path / "plot.png"), "title")
    assert not os.path.exists(tmp_path / "plot.png")


def test_findings_runs_cover_the_issue():
    runs = findings.default_runs()
    names = [r["name"] for r in runs]
    assert len(set(names)) == len(names)
    sweep = sorted(r["weight_decay"] for r in runs if "weight_decay" in r["groups"])
    assert sweep == [0.0, 5e-6, 1e-5, 5e-5, 1e-4]
    assert {(r["step"], r["optimizer"]) for r in runs if "optimizer" in r["groups"]} == {
        (1, "adam"), (1, "sgd"), (2, "adam"), (2, "sgd")}
    for r in runs:  # a step-2 run starts from a step-1 run that comes before it
        if r["step"] == 2:
            assert r["init"] in names[:names.index(r["name"])]


def test_c2i_reference_is_the_initialisation_of_the_seed_the_run_started_with():
    """A step-1 run resumed with another --seed measures C2I against its own first weights."""
    from argparse import Namespace

    from utils.analysis import c2i_reference
    from utils.run_folder import TrainState
    torch.manual_seed(3)
    first = reactnet_a(binary_weights=False, num_classes=4).state_dict()
    resumed = reactnet_a(binary_weights=False, num_classes=4)  # trained weights, any
    rng = torch.get_rng_state()
    reference = c2i_reference(Namespace(step=1), TrainState(epoch=2, init_seed=3), resumed, 4, print)
    assert torch.equal(torch.get_rng_state(), rng)  # the run's generator is left as it was
    assert reference.keys() == {k for k, v in first.items() if v.ndim == 4}
    assert all(torch.equal(reference[k], first[k]) for k in reference)
