"""count_ops gives the papers' numbers for ReActNet-A and scales with the input as convs do."""
import pytest

from models import reactnet_a
from utils.ops import count_ops, main

FC_MACS = 1024 * 1000


def stem_macs(side):  # 3x3 conv 3 -> 32, stride 2
    return 3 * 32 * 9 * (side // 2) ** 2


@pytest.fixture(scope="module")
def step1():
    return reactnet_a(binary_weights=False)


@pytest.fixture(scope="module")
def step2():
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
