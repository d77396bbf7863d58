"""The fast CPU path of the packed 1-bit network's binary convs (utils.export.PackedBinaryConv2d).

binary_conv.cpp is plain C++ (no torch headers, so it compiles in seconds), built at first use by
torch.utils.cpp_extension into its cache (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions),
rebuilt only when the source or the flags change, and called through ctypes on the tensors' memory.
It computes the same integer sums as the module's pure PyTorch forward and the same
floats: fma(s, scale, shift), one rounding, as torch.addcmul. Where it cannot be built (no C++ compiler, no ninja, a failed build) it
says so once and the convs run in pure PyTorch; so do CUDA tensors and dtypes other than float32.

Paths: 'avx512-vpopcntdq', 'avx2' or 'scalar', the best the CPU has unless `select` picks one;
'pure-pytorch' is the module's own forward.
"""
import ctypes
import functools
import os
import shutil
import sys
import time
import weakref
from pathlib import Path

import torch

__all__ = ["PATHS", "PURE", "library", "supported", "select", "active", "applies", "binary_conv"]

SOURCE = Path(__file__).with_name("binary_conv.cpp")
NAME = "adambnn_binary_conv"
CFLAGS = ["-O3", "-std=c++17", "-fopenmp"]
PATHS = ("scalar", "avx2", "avx512-vpopcntdq")  # the kernel's path numbers 0, 1, 2
PURE = "pure-pytorch"
BLOCK = 32  # output channels per weight block: OB in binary_conv.cpp
WORD = 64

_selected = None  # a name from select(); None: the best path of this CPU
_blocked = weakref.WeakKeyDictionary()  # module -> (its buffers' identity, blocked weights, scale, shift)

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


@functools.cache
def library():
    """The built kernel (ctypes.CDLL), or None where it cannot be built: the reason is printed once."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return _fallback(f"no C++ compiler ({compiler}) found")
    try:
        from torch.utils import cpp_extension
        start, wall = time.perf_counter(), time.time()
        path = cpp_extension.load(NAME, [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                                  is_python_module=False)
        lib = ctypes.CDLL(path)
    except Exception as e:  # a failed build or load: cpp_extension raises several kinds
        return _fallback(f"building {SOURCE.name} failed ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})")
    if os.path.getmtime(path) >= wall - 1:  # built by this call, not found in the cache
        print(f"binary conv kernel: built in {time.perf_counter() - start:.1f} s, cached in {os.path.dirname(path)}",
              file=sys.stderr)
    lib.bc_supported.restype = ctypes.c_int
    lib.bc_pack.argtypes = [_ptr, _i64, _i64, _i64, _i64, _i64, _ptr, ctypes.c_int, ctypes.c_int]
    lib.bc_conv.argtypes = [_ptr] + [_i64] * 8 + [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, ctypes.c_int, ctypes.c_int]
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
    """Run the binary convs on CPU with path `name` (one of `supported()`, or PURE); None: the best."""
    if name not in (None, PURE, *supported()):
        raise ValueError(f"binary conv path {name!r} does not run here: choose from {supported() + [PURE]}")
    global _selected
    _selected = name


def active() -> str:
    """The path the binary convs of a float32 CPU tensor take now."""
    paths = supported()
    return _selected or (paths[-1] if paths else PURE)


def applies(module, u: torch.Tensor) -> bool:
    """Whether `binary_conv` runs `module` on `u`: float32 on the CPU, with the kernel at hand."""
    return u.device.type == "cpu" and u.dtype == module.scale.dtype == torch.float32 and active() != PURE


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


def binary_conv(module, u: torch.Tensor) -> torch.Tensor:
    """`module`'s output for `u` (where `applies`) by the kernel: channels-last memory, as the pure path."""
    n, channels, h, w = u.shape
    if channels != module.in_channels:
        raise ValueError(f"{module} got an input of {channels} channels")
    k, stride, pad = module.kernel_size, module.stride, module.padding
    h_out, w_out = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    words = -(-channels // WORD)
    lib, path, threads = library(), PATHS.index(active()), torch.get_num_threads()
    x = u.detach().permute(0, 2, 3, 1).contiguous()  # no copy for a channels-last input
    planes = torch.empty(n, h + 2 * pad, w + 2 * pad, words, 2, dtype=torch.int64)
    lib.bc_pack(x.data_ptr(), n, h, w, channels, pad, planes.data_ptr(), path, threads)
    weights, scale, shift = _weights(module)
    zeros = module.zero_weights.contiguous()
    y = torch.empty(n, h_out, w_out, module.out_channels)
    lib.bc_conv(planes.data_ptr(), n, h + 2 * pad, w + 2 * pad, words, k, stride, h_out, w_out, weights.data_ptr(),
                module.out_channels, scale.data_ptr(), shift.data_ptr(), zeros.data_ptr(), len(zeros), y.data_ptr(),
                path, threads)
    return y.permute(0, 3, 1, 2)
