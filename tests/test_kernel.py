"""The C++ kernel of the packed network (utils/deploy): the integer sums of the pure path on every
path this CPU runs, the blocks' fused float parts equal to BasicBlock.forward, the same logits, the
pure PyTorch fallback where no compiler is found, and the build cached in TORCH_EXTENSIONS_DIR."""
import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from models import reactnet_a
from models.binary import BinaryConv2d
from models.reactnet import BasicBlock
from tests.test_export import RTOL
from tests.tiny import logits, max_rel_error, randomize
from utils import export
from utils.deploy import kernel
from utils.export import PackedBinaryConv2d, to_packed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def paths():
    """The kernel's paths on this CPU (it is built, or loaded from the cache, once per session)."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: only the pure PyTorch path runs here")
    assert kernel.library() is not None, "the kernel did not build (its reason is printed above)"
    return kernel.supported()


@pytest.fixture
def select(paths):
    """kernel.select for the test; the best path again afterwards."""
    yield kernel.select
    kernel.select(None)


@pytest.fixture(scope="module")
def step2():
    torch.manual_seed(0)
    model = randomize(reactnet_a(binary_weights=True, num_classes=10))
    return model, to_packed(copy.deepcopy(model)), torch.randn(3, 3, 32, 32)


@pytest.mark.parametrize("cin,cout,k,stride,batch", [(32, 16, 3, 1, 1), (96, 40, 3, 2, 3), (64, 64, 1, 1, 2),
                                                     (130, 7, 3, 2, 1), (96, 96, 1, 1, 1), (32, 32, 3, 2, 2)])
def test_every_path_gives_the_exact_integer_sums(paths, select, cin, cout, k, stride, batch):
    # Exact zeros inside and on the border of the input, weights exactly 0, channels not multiples of 64.
    g = torch.Generator().manual_seed(cin + cout)
    conv = BinaryConv2d(cin, cout, k, stride)
    with torch.no_grad():
        conv.weight.view(-1)[torch.randperm(conv.weight.numel(), generator=g)[:7]] = 0
    u = torch.randn(batch, cin, 9, 7, generator=g)
    u[u.abs() < 0.6] = 0
    u[:, :, 0] = 0
    u[:, :, :, -1] = 0
    packed = PackedBinaryConv2d.fold(conv, torch.nn.BatchNorm2d(cout).eval())
    packed.scale.fill_(1)
    packed.shift.zero_()
    expected = F.conv2d(torch.sign(u).double(), torch.sign(conv.weight).double(), stride=stride, padding=k // 2)
    select(kernel.PURE)
    pure = packed(u)
    assert torch.equal(pure.double(), expected)
    for path in paths:
        select(path)
        assert torch.equal(packed(u), pure), path
        assert torch.equal(packed(u.contiguous(memory_format=torch.channels_last)), pure), path


def test_every_path_gives_the_pure_paths_floats(paths, select):
    # fma(s, scale, shift): one rounding, as torch.addcmul.
    g = torch.Generator().manual_seed(1)
    conv, bn = BinaryConv2d(128, 96, 3, 1), randomize(torch.nn.BatchNorm2d(96))
    packed, u = PackedBinaryConv2d.fold(conv, bn), torch.randn(2, 128, 6, 6, generator=g)
    select(kernel.PURE)
    pure = packed(u)
    for path in paths:
        select(path)
        assert torch.equal(packed(u), pure), path


def test_fused_blocks_give_the_values_of_basic_block_forward(paths, select, step2):
    # Every kind of block: width kept or doubled, stride 1 or 2 (the pooled shortcut), in the network.
    _, packed, x = step2
    with torch.no_grad():
        h = packed.feature[0](x[:2])
        for block in packed.feature[1:]:
            select(kernel.PURE)
            expected = BasicBlock.forward(block, h)
            for path in paths:
                select(path)
                assert torch.equal(block(h), expected), (block.inplanes, block.planes, block.stride, path)
            h = expected


def test_the_network_gives_the_same_logits_with_and_without_the_kernel(paths, select, step2):
    model, packed, x = step2
    expected = logits(model, x)
    select(kernel.PURE)
    pure = logits(packed, x)
    for path in paths:
        select(path)
        actual = logits(packed, x)
        assert torch.equal(actual, pure), path
        assert max_rel_error(actual, expected) < RTOL and torch.equal(actual.argmax(1), expected.argmax(1))


@pytest.fixture
def no_compiler(monkeypatch):
    """The kernel as on a machine without a C++ compiler; found again afterwards."""
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    kernel.library.cache_clear()
    yield
    monkeypatch.undo()
    kernel.library.cache_clear()


def test_without_a_compiler_the_pure_path_runs(no_compiler, step2, capsys):
    model, packed, x = step2
    x = x[:1]
    assert kernel.active() == kernel.PURE and kernel.supported() == []
    actual = logits(packed, x)
    logits(packed, x)
    err = capsys.readouterr().err
    assert err.count("binary conv kernel: no C++ compiler (no-such-c++-compiler) found; the packed network's "
                     "binary convs run in pure PyTorch") == 1
    assert max_rel_error(actual, logits(model, x)) < RTOL


def test_the_build_is_cached_in_torch_extensions_dir(paths, tmp_path):
    # Each load in a fresh process: within one, cpp_extension numbers a build in another directory as
    # a new version of the extension, which the next process would build again in the usual one.
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    load = [sys.executable, "-c", "from utils.deploy import kernel; assert kernel.library()"]
    first, second = (subprocess.run(load, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
                     for _ in range(2))
    assert first.stderr.count("binary conv kernel: built in ") == 1 and f"cached in {tmp_path}" in first.stderr
    assert "binary conv kernel" not in second.stderr and any(tmp_path.rglob("*.so"))


def test_benchmark_gives_speed_ups_and_the_path(paths, capsys):
    export.main(["--benchmark", "--input-size", "32", "--batch-sizes", "1", "--rounds", "1", "--threads", "1",
                 "--layers"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ReActNet-A step 2, 32x32, cpu: ") and "at 1 thread;" in lines[0]
    assert lines[1].split()[:3] == ["float", "batch", "1"] and lines[2].split()[:3] == ["packed", "batch", "1"]
    assert lines[2].endswith(f"x)  {kernel.active()}") and lines[3].startswith("largest binary convs alone")
    assert [line.split()[:2] for line in lines[4:6]] == [["float", "3x3"], ["packed", "3x3"]] and len(lines) == 12

