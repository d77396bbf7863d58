"""Checkpoints: reading and mapping released layouts, writing atomically, and a training run's
checkpoints (one run per folder, resume, save).

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
import errno
import fcntl
import os
import pickle
import re
import shutil
import socket
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import recipe
from .cli import UserError
from .distributed import all_gather, all_gather_object, barrier, broadcast_object
from .engine import Progress

__all__ = [
    "CheckpointError", "read_checkpoint", "detect_format", "remap_state_dict", "load_weights",
    "num_classes", "checkpoint_step", "trained_input_size", "is_packed", "check_finite", "atomic_save",
    "atomic_copy", "save_checkpoint", "remove_stale_temporaries", "RunFolderError", "FolderInUse", "TrainState",
    "CheckpointSaver",
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


def num_classes(state_dict: Mapping, what="the checkpoint") -> int:
    """The classes a network's state_dict predicts: the rows of its last 2-dimensional weight
    (ReActNet-A's and ResNet's `fc.weight`). `what` names it in the error."""
    classifiers = [v for k, v in state_dict.items()
                   if k.endswith("weight") and isinstance(v, torch.Tensor) and v.dim() == 2]
    if not classifiers:
        raise CheckpointError(f"{what} has no classifier weight (no 2-dimensional '...weight' entry)")
    return classifiers[-1].shape[0]


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
                f"no space left in {folder} to write {os.path.basename(path)} (about {_size(nbytes)} "
                f"needed, {_size(shutil.disk_usage(folder).free)} free): free space there or write "
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
    _replace_atomically(dst, write, os.path.getsize(src))


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


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


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


# ---------------------------------------------------------------------------------------------
# A training run's checkpoints

CHECKPOINT, BEST, LOCK = "checkpoint.pth.tar", "model_best.pth.tar", "run.lock"
# What a started run writes besides its checkpoint: without the checkpoint a relaunch would start
# over and overwrite them.
RUN_FILES = (BEST, "log.jsonl", "args.json")
# A relaunch may change any flag but --step and --optimizer, which the saved state belongs to, and
# these only at an epoch boundary: they fix the order of the epoch's samples.
EPOCH_ORDER = ("batch_size", "seed", "world_size", "train_images")
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 1}  # state tensors per parameter
_LABELS = {"world_size": "processes", "train_images": "training images", "init_checkpoint": "--init-checkpoint"}


class RunFolderError(UserError):
    """A --save folder that this run cannot use as it is; the message says why and the way out."""


class FolderInUse(RunFolderError):
    """--save is locked by a running run: rank 0 says so for all, and nothing is written into that
    run's folder (not even its log.txt)."""
    every_rank = logged = False


@dataclass
class TrainState:
    """What changes during a run and is saved with it: the epochs done, the best val Acc@1 so far
    (None before the first validation), the position inside the current epoch, and the seed the
    weights were initialised with (step 1's reference for the analysis's C2I)."""
    epoch: int = 0
    best_top1: float | None = None
    progress: Progress = field(default_factory=Progress)
    init_seed: int = 0


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointSaver:
    """The checkpoints of one training run in its --save folder, and the policy around them.

    - One run per folder: rank 0 holds an fcntl lock on <save>/run.lock for the run's life; the
      kernel releases it when the process dies, so a killed run never leaves a stale lock. A
      second launch into the folder stops at once, naming the running one. The temporaries of
      saves that were killed are removed under the lock only.
    - `read_resume`: the folder's checkpoint.pth.tar, which every process must see alike; a folder
      holding a started run without it is refused, never overwritten.
    - `restore`: the saved run continued with this launch's flags.
    - `check_space` before each epoch, `save` after it (atomic; rank 0 writes; collective).
    `close()` releases the lock, and removes the folder again when the run wrote nothing in it.
    """

    def __init__(self, folder: str, info, log):
        self.folder, self.info, self.log = folder, info, log
        self.path = os.path.join(folder, CHECKPOINT)
        self._lock, self._made_folder, in_use = None, False, None
        if info.is_main:
            self._made_folder = not os.path.isdir(folder)
            os.makedirs(folder, exist_ok=True)
            try:
                self._lock = _lock_folder(folder)
            except FolderInUse as e:
                in_use = str(e)
        in_use = broadcast_object(in_use)  # the other processes stop with rank 0
        if in_use:
            raise FolderInUse(in_use)
        if info.is_main:
            for name in remove_stale_temporaries(folder):
                log(f"=> removed {name}, left by a save that was killed")

    def close(self) -> None:
        if self._lock is None:
            return
        if os.listdir(self.folder) == [LOCK]:  # the run stopped before writing anything
            os.remove(os.path.join(self.folder, LOCK))
            if self._made_folder:
                os.rmdir(self.folder)
        os.close(self._lock)
        self._lock = None

    def read_resume(self, step: int) -> dict | None:
        """This run's own checkpoint, or None for a new run. Rank 0's file decides; every process
        must see the same one (same size, epoch and position), or all stop: --save is not shared."""
        ckpt, error, view = None, None, None
        if os.path.isfile(self.path):
            try:
                ckpt = read_checkpoint(self.path)
                view = (os.path.getsize(self.path), ckpt.get("epoch"), ckpt.get("iteration", 0))
            except CheckpointError as e:
                error, view = e, "unreadable"
        views = all_gather_object(view)
        differ = [rank for rank, v in enumerate(views) if v != views[0]]
        if differ:
            raise RunFolderError(f"process(es) {differ} see {self.path} differently from rank 0 (rank 0: "
                                 f"{views[0] or 'no file'}; here: {view or 'no file'}): --save must be a "
                                 "folder on a filesystem that every node shares")
        if error is not None:
            raise error
        if ckpt is None:
            started = [f for f in RUN_FILES if os.path.exists(os.path.join(self.folder, f))]
            if started:
                raise RunFolderError(f"--save {self.folder} holds a run ({', '.join(started)}) but no {CHECKPOINT} "
                                     "to continue from, and a new run would overwrite it: pass another --save, "
                                     "or move those files away")
            return None
        if checkpoint_step(ckpt) != step:
            raise RunFolderError(f"{self.path} is a step-{checkpoint_step(ckpt)} checkpoint, this is step "
                                 f"{step}: pass another --save")
        return ckpt

    def restore(self, ckpt: dict, args, student: nn.Module, optimizer, train_images: int) -> tuple:
        """Continue the saved run: weights, optimizer state, RNG, position. Returns the TrainState
        and the lines saying what this launch changes.

        A changed flag applies from here on (the caller builds the schedule from the new
        --learning_rate and --epochs; --weight_decay is set here), except --optimizer, refused,
        and EPOCH_ORDER, refused in the middle of an epoch. --init-checkpoint is not read again."""
        path = self.path
        saved = {**ckpt["args"], "world_size": ckpt.get("world_size"), "train_images": ckpt.get("train_images")}
        now = {**vars(args), "world_size": self.info.world_size, "train_images": train_images}
        optimizer_name = saved.get("optimizer", "adam")  # checkpoints from before --optimizer: adam
        if optimizer_name != args.optimizer:
            raise RunFolderError(f"{path} was trained with --optimizer {optimizer_name}, not {args.optimizer}: "
                                 "pass another --save to start a new run")
        saved_classes = num_classes(ckpt["state_dict"])
        if saved_classes != student.fc.out_features:
            raise RunFolderError(f"{path} has {saved_classes} classes and the data {student.fc.out_features}: "
                                 "resume with the data it was trained on, or pass another --save")
        changed = {k: f"{_LABELS.get(k, '--' + k)} {saved[k]} -> {now[k]}" for k in now
                   if saved.get(k) is not None and saved[k] != now[k]}
        iteration, progress = ckpt.get("iteration", 0), Progress()
        if iteration:
            order = [changed[k] for k in EPOCH_ORDER if k in changed]
            if order:
                raise RunFolderError(f"{path} stopped in the middle of epoch {ckpt['epoch']}, whose sample order "
                                     f"depends on what changed ({', '.join(order)}): relaunch with the old "
                                     "values to finish the epoch, then change them")
            sums = ckpt["progress"]["sums"][self.info.rank].to(self.info.device)  # this process's
            progress = Progress(iteration, sums[:3].float(), int(sums[3]), ckpt["progress"]["time"])
        load_weights(student, ckpt)
        optimizer.load_state_dict(ckpt["optimizer"])
        recipe.set_weight_decay(optimizer, args.weight_decay)
        set_rng_state(ckpt["rng"])
        state = TrainState(epoch=ckpt["epoch"], best_top1=ckpt.get("best_top1_acc"), progress=progress,
                           init_seed=ckpt.get("init_seed", saved.get("seed", 0)))
        init = changed.pop("init_checkpoint", None)
        notes = [f"changed, applied from now on: {', '.join(changed.values())}"] if changed else []
        if init:
            notes.append(f"{init} is not read: step 2 continues from its own checkpoint (pass another "
                         "--save to start from the new one)")
        return state, notes

    def check_space(self, student: nn.Module, optimizer_name: str) -> None:
        """Stop (collectively) before an epoch whose checkpoint the disk cannot hold: the bytes of
        the last checkpoint, or of the weights and the optimizer's state."""
        problem = None
        if self.info.is_main:
            if os.path.isfile(self.path):
                needed = os.path.getsize(self.path)
            else:
                needed = tensor_bytes(student.state_dict()) + OPTIMIZER_STATES[optimizer_name] * sum(
                    p.numel() * p.element_size() for p in student.parameters())
            free = shutil.disk_usage(self.folder).free
            if free < needed:
                problem = (f"{self.folder} has {_size(free)} free and a checkpoint needs about {_size(needed)}: "
                           "free space there or pass another --save; stopped before training an epoch that "
                           "could not be saved")
        problem = broadcast_object(problem)
        if problem:
            raise RunFolderError(problem)

    def save(self, state: TrainState, student: nn.Module, optimizer, record: dict, is_best: bool = False):
        """Write checkpoint.pth.tar (and model_best.pth.tar when `is_best`) on rank 0, atomically;
        collective. A mid-epoch state (progress.iteration > 0) saves every process's running
        metrics, so that each continues its own. `record`: what describes the run (step, args...)."""
        progress = None
        if state.progress.iteration:
            p = state.progress
            sums = torch.cat([p.sums.double(), p.sums.new_tensor([p.count]).double()])
            progress = {"sums": all_gather(sums).cpu(), "time": p.time}
        check_finite(student.state_dict(), "the weights to be saved")
        if self.info.is_main:
            save_checkpoint({
                **record, "epoch": state.epoch, "iteration": state.progress.iteration, "progress": progress,
                "state_dict": student.state_dict(), "best_top1_acc": state.best_top1,
                "optimizer": optimizer.state_dict(), "rng": rng_state(), "init_seed": state.init_seed,
            }, self.folder, is_best)
        barrier()


def _lock_folder(folder: str) -> int:
    """An open descriptor holding the exclusive lock on <folder>/run.lock, which then names this
    process; FolderInUse naming the holder when another process has it."""
    path = os.path.join(folder, LOCK)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 1000).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FolderInUse(f"--save {folder} is in use by another run ({holder}): one run per folder; "
                              "wait for it to end or stop it, or pass another --save") from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # a run that ended meanwhile removed the file it locked: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
             .encode())
    return fd
