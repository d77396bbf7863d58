"""The fast CPU path of the packed 1-bit network (utils.export): its binary convs, and with
utils.deploy.block each whole block, float parts included, in one C++ kernel call.

binary_conv.cpp is plain C++ (no torch headers, no OpenMP: it has its own thread pool), compiled
at first use with $CXX (default c++; a command with arguments, such as "ccache g++", is run as the
shell would split it) into TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions, in the folder
adambnn_binary_conv, as binary_conv-HASH.so: HASH is that of the source, the compiler command and
the flags, so checkouts of the same source share one build and different sources never replace
each other's. It is called through ctypes on the tensors' memory. It computes the same integer sums
as PackedBinaryConv2d's pure PyTorch forward and the same floats: fma(s, scale, shift), one
rounding, as torch.addcmul; a block's float parts are PyTorch's float32 operations in PyTorch's
order. Where it cannot be built (no C++ compiler, a failed build) or loaded (a damaged file that a
rebuild does not mend) it says so once and everything runs in pure PyTorch; so do CUDA tensors and
dtypes other than float32.

Paths: 'avx512-vpopcntdq', 'avx2' or 'scalar', the best the CPU has unless `select` picks one;
'pure-pytorch' is the modules' own forward.
"""
import contextlib
import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref

import torch
import torch.nn.functional as F

__all__ = ["PATHS", "PURE", "library", "library_path", "supported", "select", "active", "applies", "fits",
           "own_threads", "binary_conv", "block", "blocks"]

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "binary_conv.cpp")
# -ffp-contract=off: the fused float parts round each operation as PyTorch does (no fused multiply-add
# where PyTorch rounds twice).
FLAGS = ["-O3", "-std=c++20", "-ffp-contract=off", "-fPIC", "-shared", "-pthread"]
PATHS = ("scalar", "avx2", "avx512-vpopcntdq")  # the kernel's path numbers 0, 1, 2
PURE = "pure-pytorch"
WORD = 32  # channels per packed word in the kernel

_selected = None  # a name from select(); None: the best path of this CPU
_own = {"depth": 0, "threads": 1}  # own_threads: how many are within it, torch's threads before it
_own_lock = threading.Lock()
_plans = weakref.WeakKeyDictionary()  # module -> (the identity of what it was made from, its plan)

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class _Conv(ctypes.Structure):
    """bc_conv of binary_conv.cpp, field by field."""
    _fields_ = [*((name, _i64) for name in ("k", "stride", "in_channels", "out", "block")),
                *((name, _ptr) for name in ("weights", "scale", "shift", "zeros", "zero_start", "tap_ones"))]


class _Block(ctypes.Structure):
    """bc_block_args of binary_conv.cpp, field by field."""
    _fields_ = [("x", _ptr), *((name, _i64) for name in ("n", "h", "w", "x_stride")), ("input_bias", _ptr),
                ("a", _Conv), ("residual", _i64), *((name, _ptr) for name in ("bias1", "slope1", "bias_out1",
                                                                               "next_bias")),
                ("b", _Conv), *((name, _ptr) for name in ("bias2", "slope2", "bias_out2", "y")), ("y_stride", _i64)]


def _compiler() -> list:
    """$CXX (default c++) split as the shell splits it."""
    return shlex.split(os.environ.get("CXX") or "c++")


def library_path(compiler=None) -> str:
    """Where the build of this source with `compiler` (default: $CXX) is cached."""
    compiler = compiler or _compiler()
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read() + "\0".join(compiler + FLAGS).encode()).hexdigest()[:16]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions")
    return os.path.join(root, "adambnn_binary_conv", f"binary_conv-{digest}.so")


class _BuildError(Exception):
    pass


def _build(compiler: list, path: str) -> None:
    """Compile SOURCE to `path`, and its digest beside it, atomically (a process that loads it
    meanwhile sees the old file or the whole new one)."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, temporary = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
    except OSError as e:
        raise _BuildError(f"cannot write to {folder}: {e.strerror}") from None
    try:
        done = subprocess.run([*compiler, *FLAGS, SOURCE, "-o", temporary], capture_output=True, text=True)
        if done.returncode:
            lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}"]
            raise _BuildError(next((line for line in lines if "error" in line), lines[0]).strip())
        with open(temporary, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would keep it from others sharing the folder
        os.replace(temporary, path)
        with open(temporary, "w") as f:
            f.write(digest)
        os.replace(temporary, path + ".sha256")
    except OSError as e:
        raise _BuildError(str(e)) from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _intact(path: str) -> bool:
    """Whether `path` is the file a build wrote (its digest beside it): loading a file cut short
    crashes the process (SIGBUS), it does not raise."""
    try:
        with open(path, "rb") as f, open(path + ".sha256") as g:
            return hashlib.sha256(f.read()).hexdigest() == g.read()
    except OSError:
        return False


def _load(path: str):
    lib = ctypes.CDLL(path)
    lib.bc_supported.restype = ctypes.c_int
    lib.bc_block.argtypes = [ctypes.POINTER(_Block), ctypes.c_int, ctypes.c_int]
    lib.bc_block.restype = None
    lib.bc_blocks.argtypes = [ctypes.POINTER(_Block), _i64, _ptr, _i64, _i64, _i64, _i64, _ptr,
                              ctypes.c_int, ctypes.c_int]
    lib.bc_blocks.restype = None
    lib.bc_tap_ones.argtypes = [ctypes.POINTER(_Conv), _ptr]
    lib.bc_tap_ones.restype = None
    lib.best = lib.bc_supported().bit_length() - 1  # the best path this CPU runs
    return lib


@functools.cache
def library():
    """The built kernel (ctypes.CDLL), or None where it cannot be had: the reason is printed once."""
    compiler = _compiler()
    if not compiler or shutil.which(compiler[0]) is None:
        return _fallback(f"no C++ compiler ({os.environ.get('CXX') or 'c++'}) found")
    path = library_path(compiler)
    for attempt in range(2):  # a damaged file, or one that does not load, is built again, once
        start = time.perf_counter()
        if attempt or not _intact(path):
            try:
                _build(compiler, path)
            except _BuildError as e:
                return _fallback(f"building {os.path.basename(SOURCE)} failed ({e})")
            print(f"binary conv kernel: built in {time.perf_counter() - start:.1f} s, cached in "
                  f"{os.path.dirname(path)}", file=sys.stderr)
        try:
            return _load(path)
        except (OSError, AttributeError) as e:
            error = e
    return _fallback(f"{path} does not load ({error}) even rebuilt; delete the folder {os.path.dirname(path)}")


def _fallback(reason: str):
    print(f"binary conv kernel: {reason}; the packed network's binary convs run in pure PyTorch (slower)",
          file=sys.stderr)
    return None


def supported() -> list:
    """The kernel's paths that run on this CPU, best last; [] without the kernel."""
    lib = library()
    return [name for i, name in enumerate(PATHS) if lib is not None and lib.bc_supported() >> i & 1]


def select(name=None) -> None:
    """Run the packed network on CPU with path `name` (one of `supported()`, or PURE); None: the best."""
    if name not in (None, PURE, *supported()):
        raise ValueError(f"binary conv path {name!r} does not run here: choose from {supported() + [PURE]}")
    global _selected
    _selected = name


def active() -> str:
    """The path a float32 CPU input takes now."""
    lib = library()
    return _selected or (PATHS[lib.best] if lib is not None else PURE)


def applies(module, u: torch.Tensor) -> bool:
    """Whether the kernel runs PackedBinaryConv2d `module` on `u`: float32 on the CPU, with the kernel
    at hand."""
    return u.device.type == "cpu" and u.dtype == module._buffers["scale"].dtype == torch.float32 and active() != PURE


def _identity(tensors) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in tensors)


def _padded(t, n: int):
    """A per-channel float32 parameter ([1, C, 1, 1] or [C]) as a contiguous vector of n >= C values,
    zeros past C."""
    t = t.detach().reshape(-1)
    return F.pad(t, (0, n - len(t))).contiguous()


def _conv(k: int, stride: int, in_channels: int, bits, scale, shift, zero_weights) -> tuple:
    """(_Conv, the tensors it points into) of a binary conv: `bits` int64 [out, k * k * words64] as in
    PackedBinaryConv2d.weight_bits, regrouped in int32 words of 32 input channels and in blocks of 64
    outputs (32 where out is not a multiple of 64), scale and shift padded to whole blocks, the
    weights exactly 0 as (output, word of the row, bit), by block, and the set bits of each tap."""
    out, words64, words = len(bits), -(-in_channels // 64), -(-in_channels // WORD)
    block = 64 if out % 64 == 0 else 32
    blocks = -(-out // block)
    bits = bits.view(out, k * k, words64)
    halves = torch.stack([bits & 0xFFFFFFFF, (bits >> 32) & 0xFFFFFFFF], dim=-1)  # low channels first
    halves = torch.where(halves >= 2 ** 31, halves - 2 ** 32, halves).to(torch.int32)
    rows = F.pad(halves.view(out, k * k, 2 * words64)[:, :, :words].reshape(out, -1), (0, 0, 0, blocks * block - out))
    weights = rows.view(blocks, block, -1).transpose(1, 2).contiguous()
    o, bit = zero_weights.unbind(1)
    tap, channel = bit // (words64 * 64), bit % (words64 * 64)
    zeros = torch.stack([o, tap * words + channel // WORD, channel % WORD], dim=1)[torch.argsort(o // block, stable=True)]
    zero_start = F.pad(torch.bincount(o // block, minlength=blocks).cumsum(0), (1, 0))
    zeros, zero_start = zeros.to(torch.int32).contiguous(), zero_start.contiguous()
    scale, shift = (_padded(t, blocks * block) for t in (scale, shift))
    tap_ones = torch.empty(blocks, k * k, block, dtype=torch.int32)
    conv = _Conv(k, stride, in_channels, out, block, weights.data_ptr(), scale.data_ptr(), shift.data_ptr(),
                 zeros.data_ptr(), zero_start.data_ptr(), tap_ones.data_ptr())
    library().bc_tap_ones(ctypes.byref(conv), tap_ones.data_ptr())
    return conv, (weights, scale, shift, zeros, zero_start, tap_ones)


def _module_conv(module) -> tuple:
    return _conv(module.kernel_size, module.stride, module.in_channels, module.weight_bits, module.scale,
                 module.shift, module.zero_weights)


def _plan(module, sources, make):
    """make() for `module`, kept while the tensors in `sources` stay the same."""
    key = _identity(sources)
    cached = _plans.get(module)
    if cached is None or cached[0] != key:
        cached = _plans[module] = (key, make())
    return cached[1]


@contextlib.contextmanager
def own_threads(enabled: bool = True):
    """Within it (where `enabled`): the kernel runs on the threads torch had, in its own pool, and
    torch's CPU operations on the calling thread alone (torch.set_num_threads(1), a setting of the
    process: restored when the last thread within it leaves)."""
    if not enabled:
        yield
        return
    with _own_lock:
        if _own["depth"] == 0:
            _own["threads"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _own["depth"] += 1
    try:
        yield
    finally:
        with _own_lock:
            _own["depth"] -= 1
            if _own["depth"] == 0:
                torch.set_num_threads(_own["threads"])


def _threads() -> int:
    """The kernel's threads: torch's, as they were before own_threads."""
    return _own["threads"] if _own["depth"] else torch.get_num_threads()


def _run(args: _Block) -> None:
    library().bc_block(ctypes.byref(args), PATHS.index(active()), _threads())


def _rows(t: torch.Tensor) -> tuple:
    """t [n, c, h, w] as channels-last rows: (t, its pixel stride), copied where it is not."""
    n, c, h, w = t.shape
    s = t.stride()
    if not (s[1] == 1 and s[2] == w * s[3] and s[0] == h * s[2] and s[3] >= c):
        t = t.contiguous(memory_format=torch.channels_last)
    return t, t.stride(3)


def binary_conv(module, u: torch.Tensor) -> torch.Tensor:
    """PackedBinaryConv2d `module` on `u` (where `applies`) by the kernel; the output has
    channels-last memory, as the pure path's."""
    n, channels, h, w = u.shape
    if channels != module.in_channels:
        raise ValueError(f"{module} got an input of {channels} channels")
    conv, keep = _plan(module, (module.weight_bits, module.scale, module.shift, module.zero_weights),
                       lambda: _module_conv(module))
    k, stride, pad = module.kernel_size, module.stride, module.padding
    h_out, w_out = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    x, x_stride = _rows(u.detach())
    y = torch.empty(n, h_out, w_out, module.out_channels, dtype=torch.float32)
    _run(_Block(x=x.data_ptr(), n=n, h=h, w=w, x_stride=x_stride, a=conv, y=y.data_ptr(),
                y_stride=module.out_channels))
    return y.permute(0, 3, 1, 2)


def fits(block, h: int, w: int) -> bool:
    """Whether `block` (utils.deploy.block.PackedBlock) runs on an input of h x w pixels in one kernel
    call: whole words of channels, and a shortcut whose size is the conv's or 1 (broadcast), as
    BasicBlock.forward adds it; elsewhere BasicBlock.forward runs (and raises PyTorch's error where
    the sizes do not fit)."""
    if block.inplanes % WORD or block.stride not in (1, 2):
        return False
    if block.stride == 1:
        return True
    return all(s // 2 in (1, (s - 1) // 2 + 1) for s in (h, w))


def _block_plan(b) -> tuple:
    """(_Block of `b`'s parameters, the tensors it points into)."""
    a, keep_a = _module_conv(b.binary_3x3)
    pw = [b.binary_pw] if b.inplanes == b.planes else [b.binary_pw_down1, b.binary_pw_down2]
    cat = [torch.cat([getattr(m, name) for m in pw]) for name in ("weight_bits", "scale", "shift")]
    zeros = torch.cat([m.zero_weights + torch.tensor([i * b.inplanes, 0]) for i, m in enumerate(pw)])
    pointwise, keep_b = _conv(1, 1, b.inplanes, *cat, zeros)
    first, second = a.block * -(-a.out // a.block), pointwise.block * -(-pointwise.out // pointwise.block)
    vectors = [_padded(t, first) for t in (b.move12.bias, b.prelu1.weight, b.move13.bias, b.move21.bias)]
    vectors += [_padded(t, second) for t in (b.move22.bias, b.prelu2.weight, b.move23.bias)]
    move11 = _padded(b.move11.bias, b.inplanes)
    bias1, slope1, bias_out1, next_bias, bias2, slope2, bias_out2 = (t.data_ptr() for t in vectors)
    args = _Block(input_bias=move11.data_ptr(), a=a, residual=1, bias1=bias1, slope1=slope1, bias_out1=bias_out1,
                  next_bias=next_bias, b=pointwise, bias2=bias2, slope2=slope2, bias_out2=bias_out2)
    return args, (keep_a, keep_b, vectors, move11)


def _block_sources(b) -> list:
    """Every tensor the plan of block `b` is made from (read from the modules' dicts:
    nn.Module.__getattr__ is slow)."""
    return [t for m in b._modules.values() for d in (m._parameters, m._buffers) for t in d.values()]


def _check_input(b, channels: int) -> None:
    if channels != b.inplanes:
        raise ValueError(f"{type(b).__name__} of {b.inplanes} channels got an input of {channels}")


def block(b, x: torch.Tensor) -> torch.Tensor:
    """PackedBlock `b` on `x` (where `applies` and `fits`) in one kernel call: BasicBlock.forward's
    values; the output has channels-last memory."""
    n, channels, h, w = x.shape
    _check_input(b, channels)
    args, keep = _plan(b, _block_sources(b), lambda: _block_plan(b))
    h_out, w_out = (h - 1) // b.stride + 1, (w - 1) // b.stride + 1
    x, x_stride = _rows(x.detach())
    y = torch.empty(n, h_out, w_out, b.planes, dtype=torch.float32)
    call = _Block.from_buffer_copy(args)  # the plan is shared; this call's tensors go in a copy
    call.x, call.n, call.h, call.w, call.x_stride = x.data_ptr(), n, h, w, x_stride
    call.y, call.y_stride = y.data_ptr(), b.planes
    _run(call)
    return y.permute(0, 3, 1, 2)


def _chain_plan(chain) -> tuple:
    """(an array of _Block of the blocks of `chain`, the tensors they point into)."""
    plans = [_block_plan(b) for b in chain]
    return (_Block * len(plans))(*(args for args, _ in plans)), [keep for _, keep in plans]


def blocks(owner, chain, x: torch.Tensor) -> torch.Tensor:
    """PackedBlocks `chain` in turn from `x`, each on the previous one's output (each where `applies`
    and `fits`), in one kernel call, their plan kept with module `owner`: the values of calling
    them in turn, without a tensor for each block's output or a Python call for each block; the
    output has channels-last memory."""
    n, channels, h, w = x.shape
    _check_input(chain[0], channels)
    plan, keep = _plan(owner, [t for b in chain for t in _block_sources(b)], lambda: _chain_plan(chain))
    for b in chain:
        h, w = (h - 1) // b.stride + 1, (w - 1) // b.stride + 1
    x, x_stride = _rows(x.detach())
    y = torch.empty(n, h, w, chain[-1].planes, dtype=torch.float32)
    library().bc_blocks(plan, len(chain), x.data_ptr(), n, *x.shape[2:], x_stride, y.data_ptr(),
                        PATHS.index(active()), _threads())
    return y.permute(0, 3, 1, 2)
