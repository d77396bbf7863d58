"""The fast CPU path of the packed 1-bit network (utils.export): its binary convs, and with
utils.deploy.block the float parts of its blocks, in one C++ kernel call per conv.

binary_conv.cpp is plain C++ (no torch headers, so it compiles in seconds), built at first use by
torch.utils.cpp_extension into its cache (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions),
rebuilt only when the source or the flags change, and called through ctypes on the tensors' memory.
It computes the same integer sums as PackedBinaryConv2d's pure PyTorch forward and the same floats:
fma(s, scale, shift), one rounding, as torch.addcmul; the fused float parts are PyTorch's float32
operations in PyTorch's order. Where it cannot be built (no C++ compiler, no ninja, a failed build)
it says so once and everything runs in pure PyTorch; so do CUDA tensors and dtypes other than
float32.

Paths: 'avx512-vpopcntdq', 'avx2' or 'scalar', the best the CPU has unless `select` picks one;
'pure-pytorch' is the modules' own forward.
"""
import ctypes
import functools
import os
import shutil
import sys
import time
import weakref
from dataclasses import dataclass

import torch

__all__ = ["PATHS", "PURE", "Fused", "library", "supported", "select", "active", "applies", "sign_planes", "binary_conv"]

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "binary_conv.cpp")
NAME = "adambnn_binary_conv"
# -ffp-contract=off: the fused float parts round each operation as PyTorch does (no fused multiply-add
# where PyTorch rounds twice).
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
PATHS = ("scalar", "avx2", "avx512-vpopcntdq")  # the kernel's path numbers 0, 1, 2
PURE = "pure-pytorch"
BLOCK = 32  # output channels per weight block: OB in binary_conv.cpp
WORD = 64

_selected = None  # a name from select(); None: the best path of this CPU
_blocked = weakref.WeakKeyDictionary()  # module -> (its buffers' identity, blocked weights, scale, shift)

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class _ConvArgs(ctypes.Structure):
    """bc_conv_args of binary_conv.cpp, field by field."""
    _fields_ = [("planes", _ptr), *((name, _i64) for name in ("n", "hp", "wp", "words", "k", "stride", "ho", "wo")),
                ("weights", _ptr), ("out", _i64), ("scale", _ptr), ("shift", _ptr), ("zeros", _ptr),
                ("nzeros", _i64), ("residual", _ptr), ("residual_stride", _i64), ("bias", _ptr), ("slope", _ptr),
                ("bias_out", _ptr), ("y", _ptr), ("y_stride", _i64), ("next_bias", _ptr), ("next_planes", _ptr)]


@dataclass
class Fused:
    """What a binary conv's kernel call does besides the conv (utils.deploy.block), each part
    skipped when None, in the order of models.reactnet.BasicBlock.forward: the input is `planes`
    (packed already) or sign(u + input_bias); then y = prelu(y + residual + bias, slope) + bias_out,
    written into `out` (a channels-last view, e.g. half of a concatenation) when given; and
    sign(y + next_bias) packed into `next_planes` for a following 1x1 conv."""
    planes: torch.Tensor | None = None
    input_bias: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    slope: torch.Tensor | None = None
    bias_out: torch.Tensor | None = None
    out: torch.Tensor | None = None
    next_bias: torch.Tensor | None = None
    next_planes: torch.Tensor | None = None  # set by the call


@functools.cache
def library():
    """The built kernel (ctypes.CDLL), or None where it cannot be built: the reason is printed once."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return _fallback(f"no C++ compiler ({compiler}) found")
    here = os.path.dirname(sys.executable)  # requirements.txt's ninja, in a venv that is not activated
    if shutil.which("ninja") is None and shutil.which("ninja", path=here):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    try:
        from torch.utils import cpp_extension
        start, wall = time.perf_counter(), time.time()
        path = cpp_extension.load(NAME, [SOURCE], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                                  is_python_module=False)
        lib = ctypes.CDLL(path)
    except Exception as e:  # cpp_extension raises several kinds for a failed build or load
        lines = str(e).strip().splitlines() or [type(e).__name__]
        detail = next((line for line in lines if "error:" in line), lines[0])  # the compiler's first error
        return _fallback(f"building {os.path.basename(SOURCE)} failed ({detail.strip()})")
    if os.path.getmtime(path) > wall:  # built by this call, not found in the cache
        print(f"binary conv kernel: built in {time.perf_counter() - start:.1f} s, cached in {os.path.dirname(path)}",
              file=sys.stderr)
    lib.bc_supported.restype = ctypes.c_int
    lib.bc_pack.argtypes = [_ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _ptr, ctypes.c_int, ctypes.c_int]
    lib.bc_conv.argtypes = [ctypes.POINTER(_ConvArgs), ctypes.c_int, ctypes.c_int]
    return lib


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
    paths = supported()
    return _selected or (paths[-1] if paths else PURE)


def applies(module, u: torch.Tensor) -> bool:
    """Whether the kernel runs PackedBinaryConv2d `module` on `u`: float32 on the CPU, with the kernel
    at hand."""
    return u.device.type == "cpu" and u.dtype == module.scale.dtype == torch.float32 and active() != PURE


def _call():
    return library(), PATHS.index(active()), torch.get_num_threads()


def _ptr_of(t):
    return None if t is None else t.data_ptr()


def _vector(t, n: int):
    """A per-channel parameter ([1, C, 1, 1] or [C]) as a contiguous [n] float32 vector, or None."""
    if t is None:
        return None
    t = t.detach().reshape(-1).contiguous()
    if t.numel() != n or t.dtype != torch.float32:
        raise ValueError(f"a per-channel float32 vector of {n} values was expected, got {t.dtype} {list(t.shape)}")
    return t


def _row_stride(t, shape) -> int:
    """The pixel stride of float32 `t`, [n, c, h, w] laid out as channels-last rows (its channels at
    stride 1, its pixels in order); ValueError otherwise."""
    n, c, h, w = t.shape
    s = t.stride()
    if t.dtype != torch.float32 or list(t.shape) != list(shape) or s[1] != 1 or s[2] != w * s[3] or s[0] != h * s[2]:
        raise ValueError(f"expected float32 channels-last rows of shape {list(shape)}, got {t.dtype} "
                         f"{list(t.shape)} strides {list(s)}")
    return s[3]


def sign_planes(u: torch.Tensor, bias=None, pad: int = 0) -> torch.Tensor:
    """The bit-planes of sign(u + bias), u [n, c, h, w] float32: int64 [n, h + 2 pad, w + 2 pad, words, 2]
    (m, p), a zero border of `pad` pixels."""
    lib, path, threads = _call()
    n, channels, h, w = u.shape
    x = u.detach().permute(0, 2, 3, 1).contiguous()  # no copy for a channels-last input
    bias = _vector(bias, channels)
    planes = torch.empty(n, h + 2 * pad, w + 2 * pad, -(-channels // WORD), 2, dtype=torch.int64)
    lib.bc_pack(x.data_ptr(), _ptr_of(bias), n, h, w, channels, pad, planes.data_ptr(), path, threads)
    return planes


def _weights(module):
    """The module's sign bits in blocks of BLOCK outputs, [out / BLOCK, taps * words, BLOCK], and its
    scale and shift padded to whole blocks; kept while its buffers stay the same."""
    buffers = (module.weight_bits, module.scale, module.shift)
    key = tuple((t.data_ptr(), t._version) for t in buffers)
    cached = _blocked.get(module)
    if cached is None or cached[0] != key:
        extra = -module.out_channels % BLOCK
        bits, scale, shift = (torch.nn.functional.pad(t, (0, 0, 0, extra) if t.dim() == 2 else (0, extra))
                              for t in buffers)
        bits = bits.view(-1, BLOCK, bits.shape[1]).transpose(1, 2).contiguous()
        cached = _blocked[module] = (key, bits, scale.contiguous(), shift.contiguous())
    return cached[1:]


def binary_conv(module, u: torch.Tensor, fused: Fused | None = None) -> torch.Tensor:
    """PackedBinaryConv2d `module` on `u` (where `applies`) by the kernel, and the float parts of
    `fused`; the output has channels-last memory, as the pure path's."""
    fused = fused or Fused()
    n, channels, h, w = u.shape
    if channels != module.in_channels:
        raise ValueError(f"{module} got an input of {channels} channels")
    k, stride, pad, out = module.kernel_size, module.stride, module.padding, module.out_channels
    h_out, w_out = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    words, shape = -(-channels // WORD), (n, out, h_out, w_out)
    planes = fused.planes if fused.planes is not None else sign_planes(u, fused.input_bias, pad)
    if planes.shape != (n, h + 2 * pad, w + 2 * pad, words, 2):
        raise ValueError(f"packed input of shape {list(planes.shape)} does not fit {module} on {list(u.shape)}")
    y = fused.out
    if y is None:
        y = torch.empty(n, h_out, w_out, out, dtype=torch.float32).permute(0, 3, 1, 2)
    residual = fused.residual
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)  # a no-op in a block
    bias, slope, bias_out, next_bias = (_vector(t, out) for t in (fused.bias, fused.slope, fused.bias_out,
                                                                     fused.next_bias))
    if next_bias is not None:
        fused.next_planes = torch.empty(n, h_out, w_out, -(-out // WORD), 2, dtype=torch.int64)
    weights, scale, shift = _weights(module)
    zeros = module.zero_weights.contiguous()
    args = _ConvArgs(planes.data_ptr(), n, h + 2 * pad, w + 2 * pad, words, k, stride, h_out, w_out,
                     weights.data_ptr(), out, scale.data_ptr(), shift.data_ptr(), zeros.data_ptr(), len(zeros),
                     _ptr_of(residual), 0 if residual is None else _row_stride(residual, shape), _ptr_of(bias),
                     _ptr_of(slope), _ptr_of(bias_out), y.data_ptr(), _row_stride(y, shape), _ptr_of(next_bias),
                     _ptr_of(fused.next_planes))
    lib, path, threads = _call()
    lib.bc_conv(ctypes.byref(args), path, threads)
    return y
