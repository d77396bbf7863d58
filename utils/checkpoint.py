"""Reading, mapping and saving checkpoints.

A checkpoint file is untrusted input: it is always read with `torch.load(weights_only=True)`,
which refuses any pickle that would import or call code. The layouts in use are mapped onto
the model by `remap_state_dict` (timm's `checkpoint_filter_fn` idea), then loaded strictly;
anything that does not fit raises `CheckpointError` naming the layout and the offending keys.

Layouts (`load_weights` returns the name):
    'this-repo'        this repository's training checkpoint: a dict with 'state_dict' and 'step'
    'adambnn-release'  the AdamBNN release: a dict with 'state_dict', keys prefixed 'module.'
    'reactnet-release' the ReActNet release: binary conv weights named 'weights', flattened to
                       [out*in*k*k, 1] (legacy serialization), bare or inside a 'state_dict' dict
    'state_dict'       a bare state_dict, with or without the 'module.' prefix
"""
import os
import pickle
import re
import shutil
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn as nn

from .cli import UserError

__all__ = [
    "CheckpointError", "read_checkpoint", "detect_format", "remap_state_dict", "load_weights",
    "checkpoint_step", "is_packed", "check_finite", "atomic_save", "atomic_copy", "save_checkpoint",
    "remove_stale_temporaries",
]

# Prefixes added by wrappers: nn.DataParallel / DDP ('module.'), torch.compile ('_orig_mod.').
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# What torch.load(weights_only=True) reads back; exact types, since subclasses such as numpy.float64
# (a float) or a namedtuple (a tuple) pickle as their own class and are refused on load.
_PLAIN_MAPPINGS, _PLAIN_SEQUENCES = (dict, OrderedDict), (list, tuple, torch.Size)
_PLAIN_LEAVES = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device)
_SHOW = 5  # offending keys named per kind of problem
PACKED_FORMAT = "adambnn-packed-reactnet-a"  # the 'format' of utils.export's packed files


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


def read_checkpoint(path):
    """Load a checkpoint file onto the CPU with `weights_only=True`: tensors and plain containers
    only, so a file whose unpickling would run code is refused and nothing in it runs."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)|unsupported GLOBAL (\S+)", str(e))
        if not found:  # random bytes, a truncated or damaged pickle: nothing trusted would help
            raise CheckpointError(f"{path!r} is corrupt or not a PyTorch checkpoint (its contents do not "
                                  "unpickle); an interrupted download or copy leaves such a file: fetch "
                                  "it again") from None
        raise CheckpointError(
            f"refused {path!r}: it is not a plain weights file (it would call {found.group(1) or found.group(2)}). "
            "It was read with torch.load(weights_only=True) and nothing in it was executed. Only if you "
            "trust its source: torch.save(torch.load(path, weights_only=False)['state_dict'], new_path), "
            "then load new_path.") from None
    except (RuntimeError, EOFError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"{path!r} is corrupt or not a PyTorch checkpoint ({type(e).__name__}: {e}); "
            "an interrupted download or copy leaves a truncated file: fetch it again") from None


def detect_format(obj) -> tuple[str, Mapping]:
    """Return (layout name, the state_dict inside `obj`)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"not a checkpoint: expected a dict, got {type(obj).__name__}")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        fmt, state_dict = ("this-repo" if "step" in obj else "adambnn-release"), obj["state_dict"]
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        fmt, state_dict = "state_dict", obj
    else:
        raise CheckpointError(
            "unrecognised checkpoint layout: neither a state_dict nor a dict with 'state_dict' "
            f"(top-level keys: {_first(list(obj))})")
    if any(k.endswith(".weights") for k in state_dict):
        fmt = "reactnet-release"
    return fmt, state_dict


def remap_state_dict(state_dict: Mapping, model: nn.Module) -> dict:
    """Map a released layout onto `model`'s keys and shapes: strip wrapper prefixes, and turn the
    ReActNet release's flattened `weights` [out*in*k*k, 1] into `weight` [out, in, k, k]."""
    target = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        if key.endswith(".weights"):
            key = key[:-1]
            if key in target and value.numel() == target[key].numel():
                # ReActNet's HardBinaryConv views the flat parameter as (out, in, k, k).
                value = value.reshape(target[key].shape)
        out[key] = value
    return out


def load_weights(model: nn.Module, path_or_obj) -> str:
    """Load a checkpoint (a path, or what `read_checkpoint` returned) into `model`, strictly.

    Returns the detected layout name; raises CheckpointError naming the layout and the first
    missing, unexpected or wrongly shaped keys when it does not fit.
    """
    obj = read_checkpoint(path_or_obj) if isinstance(path_or_obj, (str, os.PathLike)) else path_or_obj
    if is_packed(obj):
        raise CheckpointError("a packed 1-bit file (utils.export) holds no float weights to load or train "
                              "from: evaluate it with evaluate.py, or run it with utils.export.load_packed")
    fmt, state_dict = detect_format(obj)
    state_dict = remap_state_dict(state_dict, model)
    target = model.state_dict()
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    wrong = [f"{k} {list(getattr(v, 'shape', []))} (model {list(target[k].shape)})"
             for k, v in state_dict.items()
             if k in target and (not isinstance(v, torch.Tensor) or v.shape != target[k].shape)]
    problems = [f"{name}: {_first(keys)}" for name, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys]
    if problems:
        raise CheckpointError(f"{fmt} checkpoint does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)
    return fmt


def checkpoint_step(obj) -> int | None:
    """The training step (1 or 2) recorded in this repository's checkpoints, else None."""
    step = obj.get("step") if isinstance(obj, Mapping) else None
    return step if step in (1, 2) else None


def is_packed(obj) -> bool:
    """Whether `obj` (what `read_checkpoint` returned) is a packed 1-bit file of utils.export."""
    return isinstance(obj, Mapping) and obj.get("format") == PACKED_FORMAT


def check_finite(state_dict: Mapping, what) -> None:
    """Raise CheckpointError naming `what` when a floating-point tensor holds NaN or inf (a run
    that diverged): such weights are never saved, evaluated or trained from."""
    bad = [k for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{what} holds non-finite values (NaN or inf) in {len(bad)} tensors "
                              f"({_first(bad)}): the training diverged; use an earlier checkpoint")


def _temporary(path) -> str:
    return f"{path}.{os.getpid()}.tmp"


def remove_stale_temporaries(folder) -> list:
    """Delete the temporaries of saves killed midway (`<file>.<pid>.tmp`, up to a checkpoint's size)
    in `folder`; returns their names. Call only while no save into `folder` is under way."""
    if not os.path.isdir(folder):
        return []
    stale = sorted(f for f in os.listdir(folder) if re.fullmatch(r".+\.pth\.tar\.\d+\.tmp", f))
    for name in stale:
        os.remove(os.path.join(folder, name))
    return stale


def _replace_atomically(path, write) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which is then renamed over `path`: a
    crash or error leaves either the old file or the new one, never a half-written one."""
    path = os.fspath(path)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if os.name == "posix":  # make the rename itself durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save(obj, path) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename over `path`."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    _replace_atomically(path, write)


def atomic_copy(src, dst) -> None:
    """Make `dst` a copy of `src`, atomically. A hard link where the filesystem allows it: a
    checkpoint is written once, not twice, and stays safe because `atomic_save` always writes a
    new file and renames it, never rewriting the old one in place; else a byte copy."""
    def write(tmp):
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
    _replace_atomically(dst, write)


def save_checkpoint(state: dict, save_dir, is_best: bool) -> None:
    """Write `save_dir/checkpoint.pth.tar`, and make `model_best.pth.tar` a copy of it when
    `is_best`, atomically.

    `state` must hold only what `torch.load(weights_only=True)` reads back (tensors, dicts, lists,
    tuples, str, int, float, bool, None): checked here, so a bad entry fails now, not on resume.
    """
    _check_plain(state, "state")
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, "checkpoint.pth.tar")
    atomic_save(state, path)
    if is_best:
        atomic_copy(path, os.path.join(save_dir, "model_best.pth.tar"))


def _check_plain(obj, where: str) -> None:
    if type(obj) in _PLAIN_MAPPINGS:
        for k, v in obj.items():
            _check_plain(k, f"{where} key {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
    elif type(obj) in _PLAIN_SEQUENCES:
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not (isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_LEAVES):
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: a checkpoint holds "
                        "only tensors, dicts, lists, tuples, str, int, float, bool and None")


def _first(keys: list) -> str:
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(map(str, keys[:_SHOW])) + more
