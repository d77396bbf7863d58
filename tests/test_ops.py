"""count_ops gives the papers' numbers for ReActNet-A and scales with the input as convs do; the
summary's layers add up to them and to the packed file."""
import copy

import pytest
import torch

from models import reactnet_a
from utils.export import to_packed
from utils.ops import count_ops, main, summary

FC_MACS = 1024 * 1000


def stem_macs(side):  # 3x3 conv 3 -> 32, stride 2
    return 3 * 32 * 9 * (side // 2) ** 2


@pytest.fixture(scope="module")
def step1():
    return reactnet_a(binary_weights=False)


@pytest.fixture(scope="module")
def step2():
    torch.manual_seed(0)
    return reactnet_a(binary_weights=True)


def test_step2_at_224_gives_the_papers_numbers(step2):
    # The original release (README): BOPs 4.82e9, FLOPs 0.12e8, OPs 0.87e8, 29.34M parameters.
    assert count_ops(step2) == {"bops": 4_816_896_000, "flops": 11_862_016, "ops": 87_126_016,
                                "params": 29_343_592}
    assert stem_macs(224) + FC_MACS == 11_862_016


def test_step1_counts_real_weight_convs_as_flops(step1):
    assert count_ops(step1) == {"bops": 0, "flops": 4_816_896_000 + 11_862_016, "ops": 4_828_758_016,
                                "params": 29_343_592}


def test_counts_scale_with_resolution_per_image(step2):
    step2.train()
    hooks = sum(len(m._forward_hooks) for m in step2.modules())
    small, large = count_ops(step2, (2, 3, 64, 64)), count_ops(step2, (1, 3, 128, 128))
    # Binary convs scale with the pixel count; so does the stem, not the fc. A batch of 2 counts one image.
    assert small["bops"] == 4_816_896_000 * 64 ** 2 // 224 ** 2 and large["bops"] == 4 * small["bops"]
    assert (small["flops"], large["flops"]) == (stem_macs(64) + FC_MACS, stem_macs(128) + FC_MACS)
    assert large["ops"] == large["flops"] + large["bops"] // 64
    assert small["params"] == large["params"]
    assert step2.training and sum(len(m._forward_hooks) for m in step2.modules()) == hooks


def test_cli_prints_both_steps(capsys):
    main(["--input-size", "32"])
    out = capsys.readouterr().out
    assert "ReActNet-A, 32x32" in out
    assert f"{4_816_896_000 // 49:,}" in out and f"{stem_macs(32) + FC_MACS:,}" in out


def test_summary_layers_sum_to_the_counts_and_the_packed_file(step2, tmp_path, capsys):
    rows, totals = summary(step2, (1, 3, 32, 32))
    counts = count_ops(step2, (1, 3, 32, 32))
    assert {k: totals[k] for k in counts} == counts
    binary = [r for r in rows if r["kind"] == "binary"]
    assert len(binary) == 31 and all(r["bits"] == 1 and r["flops"] == 0 for r in binary)
    # 1 bit per weight, in 64-bit words (the 32-channel convs of the first block pad to 64 bits),
    # and 16 bytes for each weight exactly 0 (a random initialisation has one or two).
    for r in binary:
        zeros = int((step2.get_submodule(r["layer"]).weight == 0).sum())
        words = r["params"] // 8 * (2 if r["layer"].startswith("feature.1.") else 1)
        assert r["packed_bytes"] == words + 16 * zeros
    fc = next(r for r in rows if r["layer"] == "fc")
    assert (fc["kind"], fc["params"], fc["flops"]) == ("float", FC_MACS + 1000, FC_MACS)
    assert fc["packed_bytes"] == fc["float_bytes"] == 4 * (FC_MACS + 1000)
    assert [r["layer"] for r in rows[:3]] == ["feature.0.conv1", "feature.0 (BN, PReLU, move)",
                                              "feature.1.binary_3x3"]
    # The packed sizes are those of the file utils.export writes.
    assert totals["float_bytes"] == sum(t.numel() * t.element_size() for t in step2.state_dict().values())
    packed = to_packed(copy.deepcopy(step2)).state_dict()
    assert totals["packed_bytes"] == sum(t.numel() * t.element_size() for t in packed.values())

    torch.manual_seed(0)  # the command's random network is step2, with the same weights exactly 0
    main(["--summary", "--input-size", "32"])
    out = capsys.readouterr().out
    assert "feature.13.binary_3x3" in out and f"{totals['params']:,}" in out and f"{totals['bops']:,}" in out
    assert f"float {totals['float_bytes'] / 1e6:.2f} MB, packed {totals['packed_bytes'] / 1e6:.2f} MB" in out
