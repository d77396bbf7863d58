"""The C++ kernel of the packed network (utils/deploy): the integer sums of the pure path on every
path this CPU runs and at every thread count, the blocks' fused float parts equal to
BasicBlock.forward, the same logits, input sizes that are not multiples of 32, the pure PyTorch
fallback where no compiler is found, and the build: cached in TORCH_EXTENSIONS_DIR by what it is
built from, built again where the cached file is damaged, with a compiler command of several words."""
import copy
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from models import reactnet_a
from models.binary import BinaryConv2d
from models.reactnet import BasicBlock
from tests.test_export import RTOL
from tests.tiny import logits, max_rel_error, randomize
from utils import export
from utils.checkpoint import PACKED_FORMAT
from utils.deploy import block, kernel
from utils.deploy.latency import FoldedNetwork
from utils.export import PackedBinaryConv2d, load_packed, to_packed

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


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory, step2):
    path = tmp_path_factory.mktemp("packed") / "packed.pt"
    torch.save({"format": PACKED_FORMAT, "version": export.VERSION, "arch": "reactnet_a", "num_classes": 10,
                "state_dict": step2[1].state_dict()}, path)
    return path


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
        for packed_block in packed.feature[1:]:
            select(kernel.PURE)
            expected = BasicBlock.forward(packed_block, h)
            for path in paths:
                select(path)
                assert torch.equal(packed_block(h), expected), (packed_block.inplanes, packed_block.planes,
                                                                packed_block.stride, path)
            h = expected


def test_values_exactly_0_between_and_inside_fused_blocks_are_packed_as_0_on_every_path(paths, select, step2):
    # sign(0) = 0: a block's output plus the next block's first bias, and its 3x3 conv's output plus
    # the 1x1 convs' bias, each made exactly 0 at one pixel and channel.
    _, packed, x = step2
    packed = copy.deepcopy(packed)
    inputs = {}
    hooks = [packed.feature[3].get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: inputs.setdefault(name, args[0])) for name in ("move11", "move21")]
    logits(packed, x)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        for name, u in inputs.items():
            packed.feature[3].get_submodule(name).bias[0, 5] = -u[1, 5, 2, 3]
    select(kernel.PURE)
    pure = logits(packed, x)
    for path in paths:
        select(path)
        assert torch.equal(logits(packed, x), pure), path


@pytest.fixture
def threads():
    """torch.set_num_threads for the test; torch's count again afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_the_network_gives_the_same_logits_with_and_without_the_kernel(paths, select, threads, step2, count):
    model, packed, x = step2
    threads(count)
    expected = logits(model, x)
    select(kernel.PURE)
    pure = logits(packed, x)
    for path in paths:
        select(path)
        actual = logits(packed, x)
        assert torch.equal(actual, pure), path
        assert max_rel_error(actual, expected) < RTOL and torch.equal(actual.argmax(1), expected.argmax(1))
    assert torch.get_num_threads() == count


def test_a_batch_in_pieces_gives_the_same_logits_on_every_path(paths, select, step2, monkeypatch):
    model, packed, x = step2
    monkeypatch.setattr(block, "CHUNK_PIXELS", 32 * 32)  # one image at a time up to the pool
    select(kernel.PURE)
    pure = logits(packed, x)
    # The stem (oneDNN) may round an image differently in another batch size, as in the float network.
    assert max_rel_error(pure, logits(model, x)) < RTOL
    for path in paths:
        select(path)
        assert torch.equal(logits(packed, x), pure), path


def test_threads_calling_the_kernel_at_once_get_their_own_logits(paths, step2):
    _, packed, x = step2
    inputs = [x, x.flip(0), x * 2]
    expected = [logits(packed, v) for v in inputs]
    threads = torch.get_num_threads()
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda v: logits(packed, v), inputs * 4))
    assert all(torch.equal(r, e) for r, e in zip(results, expected * 4))
    assert torch.get_num_threads() == threads  # torch's setting as it was


@pytest.mark.parametrize("size", [(48, 48), (64, 48)])
def test_load_packed_runs_at_sizes_that_are_not_multiples_of_32_on_every_path(paths, select, step2, packed_file,
                                                                             size):
    model, _, _ = step2
    packed = load_packed(packed_file)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    expected = logits(model, x)  # a pooled shortcut of size 1 added to a 2 x 2 conv output broadcasts
    select(kernel.PURE)
    pure = logits(packed, x)
    assert max_rel_error(pure, expected) < RTOL
    for path in paths:
        select(path)
        assert torch.equal(logits(packed, x), pure), path


def test_sizes_the_float_network_refuses_fail_with_its_error_on_every_path(paths, select, step2, packed_file):
    model, _, _ = step2
    packed = load_packed(packed_file)
    x = torch.randn(1, 3, 40, 40)  # 5 x 5 before the last stride-2 block: conv 3 x 3, shortcut 2 x 2
    with pytest.raises(RuntimeError) as float_error:
        logits(model, x)
    for path in paths + [kernel.PURE]:
        select(path)
        with pytest.raises(RuntimeError) as error:
            logits(packed, x)
        assert str(error.value) == str(float_error.value), path


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


@pytest.fixture
def cache(paths, monkeypatch, tmp_path):
    """An empty TORCH_EXTENSIONS_DIR for the test, the kernel not loaded yet, and a function that puts
    the session's build of this source there; the usual folder again afterwards."""
    built = kernel.library_path()

    def seed() -> str:
        path = kernel.library_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for suffix in ("", ".sha256"):
            shutil.copyfile(built + suffix, path + suffix)
        return path

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    kernel.library.cache_clear()
    yield seed
    monkeypatch.undo()
    kernel.library.cache_clear()


def load(packed_file, capsys, source=None, monkeypatch=None) -> str:
    """load_packed in a fresh process, as far as the kernel goes (from `source`, a checkout's
    binary_conv.cpp, where given): what it printed."""
    if source:
        monkeypatch.setattr(kernel, "SOURCE", str(source))
    kernel.library.cache_clear()
    load_packed(packed_file)
    return capsys.readouterr().err


def test_the_build_is_cached_in_torch_extensions_dir(cache, packed_file, tmp_path, capsys):
    first, second = load(packed_file, capsys), load(packed_file, capsys)
    assert first.count("binary conv kernel: built in ") == 1 and f"cached in {tmp_path / 'cache'}" in first
    assert second == "" and len(list(tmp_path.rglob("*.so"))) == 1 and kernel.library() is not None


def test_checkouts_of_one_source_share_a_build_and_a_changed_source_builds_its_own(cache, packed_file, tmp_path,
                                                                                 capsys, monkeypatch):
    with open(kernel.SOURCE) as f:
        source = f.read()
    cache()  # this source, built
    checkouts = {}
    for name, text in (("clone", source), ("work tree", source), ("changed", source + "// a change\n")):
        (tmp_path / name).mkdir()
        checkouts[name] = tmp_path / name / "binary_conv.cpp"
        checkouts[name].write_text(text)
    built = [load(packed_file, capsys, checkouts[name], monkeypatch).count("built in")
             for name in ("clone", "work tree", "changed", "clone", "changed", "work tree")]
    assert built == [0, 0, 1, 0, 0, 0] and len(list(tmp_path.rglob("*.so"))) == 2


def test_a_damaged_build_is_built_again(cache, packed_file, tmp_path):
    path = cache()
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])  # cut off mid-write: loading it would crash the process (SIGBUS)
    # In a fresh process, as a run after the damage is.
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")}
    run = [sys.executable, "-c", "from utils.deploy import kernel; from utils.export import load_packed; "
           f"load_packed({str(packed_file)!r}); assert kernel.library() is not None"]
    err = subprocess.run(run, env=env, cwd=ROOT, capture_output=True, text=True, check=True).stderr
    assert err.count("binary conv kernel: built in ") == 1 and kernel._intact(path)


def test_a_build_that_never_loads_names_the_folder_to_delete(cache, packed_file, tmp_path, capsys, monkeypatch):
    broken = tmp_path / "broken_compiler.py"  # writes a file that is no library
    broken.write_text("import sys\nopen(sys.argv[sys.argv.index('-o') + 1], 'w').write('not a library')\n")
    monkeypatch.setenv("CXX", f"{sys.executable} {broken}")
    err = load(packed_file, capsys)
    folder = os.path.dirname(kernel.library_path())
    assert err.count("binary conv kernel: built in ") == 2 and f"delete the folder {folder}; the packed" in err
    assert kernel.library() is None and kernel.active() == kernel.PURE


def test_a_compiler_command_with_arguments_builds_the_kernel(cache, packed_file, capsys, monkeypatch):
    monkeypatch.setenv("CXX", "c++ -pipe")  # as "ccache g++" is: a command and its arguments
    assert "binary conv kernel: built in " in load(packed_file, capsys)
    assert kernel.library() is not None and kernel.active() != kernel.PURE
    monkeypatch.setenv("CXX", "no-such-c++-compiler -O2")
    assert "no C++ compiler (no-such-c++-compiler -O2) found" in load(packed_file, capsys)


def test_benchmark_gives_speed_ups_and_the_path(paths, capsys):
    export.main(["--benchmark", "--input-size", "32", "--batch-sizes", "1", "--rounds", "1", "--threads", "1", "2",
                 "--no-compile", "--layers"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ReActNet-A step 2, 32x32, cpu: ") and f"packed: path {kernel.active()}" in lines[0]
    assert "torch 2." in lines[0] and "not compiled (--no-compile)" in lines[1]
    assert [line.split()[:2] for line in lines[3:5]] == [["1", "1"], ["2", "1"]] and lines[3].endswith("x")
    assert "packed, 1 thread / 2 threads: " in lines[5] and lines[6].startswith("packed, beside another process")
    assert "2 threads take " in lines[7] and lines[8].startswith("largest binary convs alone")
    assert [line.split()[:2] for line in lines[9:11]] == [["float", "3x3"], ["packed", "3x3"]] and len(lines) == 17


def test_the_folded_float_network_gives_the_float_logits(step2):
    model, _, x = step2
    expected = logits(model, x)
    actual = logits(FoldedNetwork(model), x)
    assert max_rel_error(actual, expected) < RTOL and torch.equal(actual.argmax(1), expected.argmax(1))
