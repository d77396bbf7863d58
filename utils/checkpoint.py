"""The checkpoint file format: reading it safely, mapping the released layouts onto the model,
what a file says of its network, and writing files atomically. What a training run does with
its checkpoints (one run per folder, resume, save) is utils/run_folder.py's.

A checkpoint file is untrusted input: it is always read with `torch.load(weights_only=True)`,
which refuses any pickle that would import or call code. The layouts in use are mapped onto
the model by `remap_state_dict` (timm's `checkpoint_filter_fn` idea), then loaded strictly;
anything that does not fit raises `CheckpointError` naming the layout and the offending keys.

Layouts (`load_weights` returns the name):
    'this-repo'        this repository's training checkpoint: a dict with 'state_dict' and 'step'
    'adambnn-release'  the AdamBNN release: a dict with 'state_dict', keys prefixed 'module.'
    'reactnet-release' the ReActNet release: binary conv weights named 'weights', flattened to
                       [out*in*k*k, 1] (legacy serialization), bare or inside a 'state_dict' dict
    'torchvision-reference'  a checkpoint of torchvision's reference scripts: a dict with 'model'
                       (a teacher's weights, say)
    'state_dict'       a bare state_dict, with or without the 'module.' prefix
"""
import errno
import os
import pickle
import re
import shutil
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn as nn

from .errors import CheckpointError, first_few

__all__ = [
    "read_checkpoint", "detect_format", "remap_state_dict", "load_weights", "misfit", "num_classes", "check_classes",
    "checkpoint_step", "trained_input_size", "recorded_classes", "is_packed", "check_finite", "check_plain", "atomic_save",
    "atomic_copy", "remove_stale_temporaries", "tensor_bytes", "size_in_mb", "PACKED_FORMAT",
]

# Prefixes added by wrappers: nn.DataParallel / DDP ('module.'), torch.compile ('_orig_mod.').
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# What torch.load(weights_only=True) reads back; exact types, since subclasses such as numpy.float64
# (a float) or a namedtuple (a tuple) pickle as their own class and are refused on load.
_PLAIN_MAPPINGS, _PLAIN_SEQUENCES = (dict, OrderedDict), (list, tuple, torch.Size)
_PLAIN_LEAVES = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device)
_SHOW = 5  # offending keys named per kind of problem
PACKED_FORMAT = "adambnn-packed-reactnet-a"  # the 'format' of utils.export's packed files


def read_checkpoint(path):
    """Load a checkpoint file onto the CPU with `weights_only=True`: tensors and plain containers
    only, so a file whose unpickling would run code is refused and nothing in it runs."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path!r} is a folder, not a checkpoint file")
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
    elif _is_state_dict(obj.get("model")):
        fmt, state_dict = "torchvision-reference", obj["model"]
    elif _is_state_dict(obj):
        fmt, state_dict = "state_dict", obj
    else:
        raise CheckpointError(
            "unrecognised checkpoint layout: neither a state_dict nor a dict with 'state_dict' or 'model' "
            f"(top-level keys: {first_few(list(obj), _SHOW)})")
    if any(k.endswith(".weights") for k in state_dict):
        fmt = "reactnet-release"
    return fmt, state_dict


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


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
    problems = misfit(state_dict, model)
    if problems:
        raise CheckpointError(f"{fmt} checkpoint does not fit {type(model).__name__}: {problems}")
    model.load_state_dict(state_dict, strict=True)
    return fmt


def misfit(state_dict: Mapping, model: nn.Module) -> str:
    """What keeps `state_dict` (with `model`'s key names) from loading strictly into `model`: the
    first missing, unexpected and wrongly shaped keys of each kind (+N more); '' when it fits."""
    target = model.state_dict()
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    wrong = [f"{k} {list(getattr(v, 'shape', []))} (model {list(target[k].shape)})"
             for k, v in state_dict.items()
             if k in target and (not isinstance(v, torch.Tensor) or v.shape != target[k].shape)]
    return "; ".join(f"{name}: {first_few(keys, _SHOW)}" for name, keys in
                     (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys)


def num_classes(state_dict: Mapping, what="the checkpoint") -> int:
    """The classes a network's state_dict predicts: the rows of its last 2-dimensional weight
    (ReActNet-A's and ResNet's `fc.weight`). `what` names it in the error."""
    classifiers = [v for k, v in state_dict.items()
                   if k.endswith("weight") and isinstance(v, torch.Tensor) and v.dim() == 2]
    if not classifiers:
        raise CheckpointError(f"{what} has no classifier weight (no 2-dimensional '...weight' entry)")
    return classifiers[-1].shape[0]


def check_classes(what: str, classes: int, data_classes: int, fix: str, error=CheckpointError) -> None:
    """`error` (one message form for every such check) when the network `what` names predicts
    `classes` classes and the data has `data_classes`; `fix` says what to do."""
    if classes != data_classes:
        raise error(f"{what} has {classes} classes but the data has {data_classes}: {fix}")


def checkpoint_step(obj) -> int | None:
    """The training step (1 or 2) recorded in this repository's checkpoints, else None."""
    step = obj.get("step") if isinstance(obj, Mapping) else None
    return step if step in (1, 2) else None


def trained_input_size(obj) -> int | None:
    """The training crop size a checkpoint records: this repository's (in its args) and packed
    files (from format version 2); the releases were trained on ImageNet at 224; None where the
    file does not say (a bare state_dict, a version-1 packed file)."""
    if is_packed(obj):
        return obj.get("input_size")
    if checkpoint_step(obj) is not None:
        return obj.get("args", {}).get("input_size")
    return 224 if detect_format(obj)[0].endswith("release") else None


def recorded_classes(obj) -> list | None:
    """The class names a file records, in the order of the network's outputs: this repository's
    checkpoints (the class folders they were trained on) and packed files made from them; None
    where the file does not say (the releases, a bare state_dict, a version-1 packed file)."""
    if not (is_packed(obj) or checkpoint_step(obj) is not None):
        return None
    classes = obj.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise CheckpointError(f"the checkpoint's 'classes' entry is not a list of class names: {str(classes)[:60]}")
    return classes


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
                              f"({first_few(bad, _SHOW)}): the training diverged; use an earlier checkpoint")


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


def _replace_atomically(path, write, nbytes: int = 0) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which is then renamed over `path`: a
    crash or error leaves either the old file or the new one, never a half-written one. A full
    disk is a CheckpointError naming the folder and the bytes (about `nbytes`) needed."""
    path = os.fspath(path)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if _disk_full(e):
            folder = os.path.dirname(os.path.abspath(path))
            raise CheckpointError(
                f"no space left in {folder} to write {os.path.basename(path)} (about {size_in_mb(nbytes)} "
                f"needed, {size_in_mb(shutil.disk_usage(folder).free)} free): free space there or write "
                "elsewhere; the previous file, if any, is intact") from None
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
    _replace_atomically(path, write, tensor_bytes(obj))


def atomic_copy(src, dst) -> None:
    """Make `dst` a copy of `src`, atomically: a file of its own (never a link), so that writing
    or replacing either one never changes the other."""
    def write(tmp):
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    _replace_atomically(dst, write, os.path.getsize(src))


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in `obj` and its containers: about the size torch.save gives it."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _disk_full(error: BaseException) -> bool:
    """Whether `error` or an error it came from says the disk is full (torch.save reports it as a
    RuntimeError raised while handling the OSError)."""
    while error is not None:
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def size_in_mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


def check_plain(obj, where: str) -> None:
    """TypeError naming the entry of `obj` that `torch.load(weights_only=True)` would not read back
    (anything but tensors, dicts, lists, tuples, str, int, float, bool and None)."""
    if type(obj) in _PLAIN_MAPPINGS:
        for k, v in obj.items():
            check_plain(k, f"{where} key {k!r}")
            check_plain(v, f"{where}[{k!r}]")
    elif type(obj) in _PLAIN_SEQUENCES:
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    elif not (isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_LEAVES):
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: a checkpoint holds "
                        "only tensors, dicts, lists, tuples, str, int, float, bool and None")
