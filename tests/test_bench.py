"""The benchmarks' baseline computes what this repository's model computes (so its timings compare
like with like), and each subcommand of `python -m utils.bench` runs. Nothing here checks timings."""
import json

import pytest
import torch

from models import reactnet_a
from tests.tiny import needs_torchcodec
from utils.bench import iteration
from utils.bench.__main__ import get_parser, main
from utils.bench.baseline import BinaryActivation, HardBinaryConv, baseline_reactnet_a
from utils.errors import UserError


@pytest.mark.parametrize("binary_weights", [False, True])
def test_baseline_same_logits_and_gradients_as_the_model(binary_weights):
    torch.manual_seed(0)
    ours = reactnet_a(binary_weights=binary_weights, num_classes=10).double()
    original = baseline_reactnet_a(binary_weights=binary_weights, num_classes=10).double()
    assert list(original.state_dict()) == list(ours.state_dict())
    with torch.no_grad():  # spread the weights so that some |W| > 1 and BN/PReLU are not at init
        for name, p in ours.named_parameters():
            p.copy_(torch.randn_like(p) * (0.8 if p.ndim == 4 else 0.3) + (1.0 if "bn" in name else 0.0))
    original.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for m in (ours, original):
        m.train()
    out_ours, out_orig = ours(x), original(x)
    torch.testing.assert_close(out_ours, out_orig, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out_ours)
    out_ours.backward(g)
    out_orig.backward(g)
    grads = dict(original.named_parameters())
    # At 32x32 the last stages are 1x1: BatchNorm over 2 values makes some gradients pure
    # cancellation (~1e-10 of the others), so the tolerance is relative to the largest gradient.
    scale = max(p.grad.abs().max().item() for p in original.parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-9, atol=1e-11 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for (k, a), b in zip(ours.state_dict().items(), original.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=k)  # BN running stats
    ours.eval(), original.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), original(x), rtol=1e-10, atol=1e-10)


def test_baseline_binarizers_are_the_original_formulas():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5], requires_grad=True)
    y = BinaryActivation()(x)
    y.sum().backward()
    assert torch.equal(y.detach(), torch.sign(x.detach()))
    assert torch.allclose(x.grad, torch.tensor([0.0, 0.0, 1.0, 2.0, 1.0, 0.0, 0.0]))
    conv = HardBinaryConv(2, 3, kernel_size=1, padding=0)
    with torch.no_grad():  # (|W| = 1 exactly avoided: see the module docstring of utils.bench.baseline)
        conv.weight.copy_(torch.tensor([[1.5, -0.5], [0.2, 0.4], [-2.0, 0.75]]).view(3, 2, 1, 1))
    u = torch.ones(1, 2, 1, 1)
    out = conv(u)
    alpha = torch.tensor([1.0, 0.3, 1.375])
    assert torch.allclose(out.view(-1), alpha * torch.tensor([0.0, 2.0, 0.0]))
    out.sum().backward()
    assert torch.equal(conv.weight.grad.view(3, 2), torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 1.0]]))


def test_iteration_benchmark_runs(tmp_path, capsys):
    path = tmp_path / "bench.json"
    res = main(["iteration", "--device", "cpu", "--batch-size", "2", "--resolution", "32", "--steps", "2",
                "--modes", "baseline,repo,bf16", "--rounds", "1", "--warmup", "0",
                "--num-classes", "10", "--no-memory", "--quiet", "--json", str(path)])
    out = capsys.readouterr().out
    assert "| mode | step | ms/iter | images/s | peak MiB | time vs baseline | memory vs baseline" in out
    assert f"torch {torch.__version__}" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| baseline", "| repo", "| bf16"]
    saved = json.loads(path.read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    for row in saved["rows"]:
        assert row["step"] == 2 and len(row["ms_all"]) == 1 and row["ms_per_iter"] > 0
        assert row["images_per_s"] == pytest.approx(2000 / row["ms_per_iter"])
        assert row["peak_mib"] is None
    assert saved["rows"][0]["time_ratio"] == 1.0


def test_cpu_peak_memory_probe_in_a_fresh_process():
    args = get_parser().parse_args(["iteration", "--batch-size", "2", "--resolution", "32",
                                    "--num-classes", "10", "--threads", "1"])
    res = iteration.measure_memory_subprocess("repo", 2, args)
    assert set(res) == {"peak_mib", "resident_before_mib", "gradients_before_mib"}
    # At least the gradients (29.3M float32 parameters: ~112 MiB) are allocated in the iteration.
    assert 100 < res["peak_mib"] < 2000 and res["resident_before_mib"] > 100


def test_loader_benchmark_runs(capsys):
    res = main(["loader", "--images", "3", "--image-size", "160x120", "--input-size", "64",
                "--reps", "1", "--train-images-per-s", "100"])
    out = capsys.readouterr().out
    assert res["images_per_s"] > 0 and "whole pipeline" in out and "workers" in out
    assert set(res["stages_ms"]) >= {"RandomResizedCrop", "Lighting", "ToTensor", "Normalize"}


def test_unknown_mode_is_refused(capsys):
    with pytest.raises(UserError, match="unknown mode"):
        iteration.parse_mode("fp16")
    assert iteration.parse_mode("bf16+channels_last") == {"bf16", "channels_last"}
    assert iteration.parse_mode("repo") == frozenset()
    with pytest.raises(SystemExit) as refused:
        main(["iteration", "--device", "cpu", "--modes", "repo,fp16"])
    assert refused.value.code == 1 and capsys.readouterr().err.startswith("error: unknown mode")


def test_flags_that_would_do_nothing_or_break_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        main(["end-to-end", "--device", "cpu", "--data", str(tmp_path), "--quality", "80"])
    assert refused.value.code == 1 and "leave them out with --data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["precision", "--resolution", "48"])
    assert refused.value.code == 1 and "--resolution 48 is not a multiple of 32" in capsys.readouterr().err


def test_three_adam_iterations_in_float64_match_the_original_training_step():
    """The whole step (loss included, computed in the logits' float64) agrees with the original's
    to float64 rounding; a float32 loss would leave ~1e-5 differences."""
    from utils import recipe
    from utils.bench.baseline import baseline_train_step
    from utils.distill import DistributionLoss
    from utils.engine import train_step

    torch.manual_seed(0)
    ours = reactnet_a(binary_weights=True, num_classes=10).double()
    original = baseline_reactnet_a(binary_weights=True, num_classes=10).double()
    original.load_state_dict(ours.state_dict(), strict=True)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).double()
    teacher.requires_grad_(False)
    optimizers = [recipe.build_optimizer(m, "adam", 1.25e-3, 5e-6) for m in (ours, original)]
    for _ in range(3):
        x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
        train_step(ours, teacher, x, DistributionLoss(), optimizers[0])
        baseline_train_step(original, teacher, x, DistributionLoss(), optimizers[1])
    reference = dict(original.named_parameters())
    worst = max((p - reference[name]).abs().max().item() for name, p in ours.named_parameters())
    assert worst < 1e-9, worst


def test_precision_check_runs_and_fp32_matches_the_float64_reference(capsys):
    res = main(["precision", "--device", "cpu", "--batch-size", "2", "--resolution", "32",
                "--steps", "2", "--num-classes", "10"])
    out = capsys.readouterr().out
    assert "| 2 | tf32 | n/a on CPU |" in out
    rows = {r["mode"]: r for r in res["rows"]}
    assert set(rows) == {"fp32", "tf32", "bf16"} and rows["tf32"]["cosine"] is None
    assert rows["fp32"]["cosine"] > 0.9999 and rows["fp32"]["min_cosine"] > 0.99
    assert -1 <= rows["bf16"]["min_cosine"] <= rows["bf16"]["cosine"] <= 1


def test_precision_check_compares_with_a_float64_loss():
    """The reference is float64 through the loss: DistributionLoss keeps float64 logits."""
    from utils.distill import DistributionLoss
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    loss = DistributionLoss()(x, torch.randn(3, 5, dtype=torch.float64))
    assert loss.dtype == torch.float64
    assert DistributionLoss()(x.detach().bfloat16(), x.detach().bfloat16()).dtype == torch.float32


@needs_torchcodec
def test_end_to_end_benchmark_runs(capsys):
    res = main(["end-to-end", "--device", "cpu", "--batch-size", "2", "--input-size", "32",
                "--images", "6", "--image-size", "80x60", "-j", "1", "--iterations", "2",
                "--warmup", "1", "--num-classes", "10", "--threads", "1"])
    out = capsys.readouterr().out
    assert [(r["step"], r["pipeline"]) for r in res["rows"]] == [(2, "model only"), (2, "pil"), (2, "torch")]
    assert all(r["images_per_s"] > 0 for r in res["rows"])
    assert "| 2 | model only |" in out and "1.00x" in out
    counts = res["rows"][2]["counts"]
    assert counts["decoded"] == 6 and counts["bad"] == 0  # 3 iterations of 2
