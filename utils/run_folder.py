"""A training run's folder (--save) and the policy around its checkpoints: one run per folder,
resume, save, the disk check, and where the weights start (step 2: --init-checkpoint).

The file format (reading, the released layouts, atomic writes) is utils/checkpoint.py's; this
module decides which file a run reads and writes, when, and what a relaunch may change.
"""
import fcntl
import os
import shutil
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import recipe
from .checkpoint import (atomic_copy, atomic_save, check_classes, check_finite, check_plain, checkpoint_step,
                         detect_format, load_weights, num_classes, read_checkpoint, remove_stale_temporaries,
                         size_in_mb, tensor_bytes)
from .distributed import all_gather, all_gather_object, barrier, broadcast_object
from .errors import CheckpointError, FolderInUse, RunFolderError

__all__ = ["Progress", "TrainState", "CheckpointSaver", "save_checkpoint", "init_checkpoint_file",
           "load_init_checkpoint", "format_top1", "CHECKPOINT", "BEST"]

CHECKPOINT, BEST, LOCK = "checkpoint.pth.tar", "model_best.pth.tar", "run.lock"
# What a started run writes besides its checkpoint: without the checkpoint a relaunch would start
# over and overwrite them.
RUN_FILES = (BEST, "log.jsonl", "args.json")
# A relaunch may change any flag but --step and --optimizer, which the saved state belongs to, and
# these only at an epoch boundary: they fix the order of the epoch's samples.
EPOCH_ORDER = ("batch_size", "seed", "world_size", "train_images")
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 1}  # state tensors per parameter
_LABELS = {"world_size": "processes", "train_images": "training images"}  # what changes besides the flags


@dataclass
class Progress:
    """Where an epoch stands, saved in a mid-epoch checkpoint so that a relaunch continues it:
    iterations done, and the running sums of the training metrics (loss * n, correct@1,
    correct@5 on this process; images; seconds)."""
    iteration: int = 0
    sums: torch.Tensor | None = None
    count: int = 0
    time: float = 0.0


@dataclass
class TrainState:
    """What changes during a run and is saved with it: the epochs trained, the best val Acc@1 so
    far (None before the first validation), the position inside the current epoch, the seed the
    weights were initialised with (step 1's reference for the analysis's C2I), and `unvalidated`:
    while the last epoch trained awaits its validation (a stop or an unreadable image during it),
    what its record needs from training ({'train': ..., 'analysis': ...}), else None."""
    epoch: int = 0
    best_top1: float | None = None
    progress: Progress = field(default_factory=Progress)
    init_seed: int = 0
    unvalidated: dict | None = None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(state: dict, save_dir, is_best: bool) -> None:
    """Write `save_dir/checkpoint.pth.tar`, and make `model_best.pth.tar` a copy of it (a file of
    its own) when `is_best`, atomically.

    `state` must hold only what `torch.load(weights_only=True)` reads back (tensors, dicts, lists,
    tuples, str, int, float, bool, None): checked here, so a bad entry fails now, not on resume.
    """
    check_plain(state, "state")
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, CHECKPOINT)
    atomic_save(state, path)
    if is_best:
        atomic_copy(path, os.path.join(save_dir, BEST))


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

    def restore(self, ckpt: dict, args, student: nn.Module, optimizer, train_images: int, flags: dict) -> tuple:
        """Continue the saved run: weights, optimizer state, RNG, position. Returns the TrainState
        and the lines saying what this launch changes, naming each flag as `flags` ({dest: the
        flag as --help spells it}, utils.cli.flag_names) does.

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
        check_classes(path, num_classes(ckpt["state_dict"]), student.fc.out_features,
                      "resume with the data it was trained on, or pass another --save", RunFolderError)
        labels = {**flags, **_LABELS}
        changed = {k: f"{labels[k]} {saved[k]} -> {now[k]}" for k in now
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
                           init_seed=ckpt.get("init_seed", saved.get("seed", 0)), unvalidated=ckpt.get("unvalidated"))
        init = changed.pop("init_checkpoint", None)
        notes = [f"changed, applied from now on: {', '.join(changed.values())}"] if changed else []
        if init:
            notes.append(f"{init} is not read: step 2 continues from its own checkpoint (pass another "
                         "--save to start from the new one)")
        return state, notes

    def check_space(self, student: nn.Module, optimizer_name: str) -> None:
        """Stop (collectively) before an epoch whose checkpoint the disk cannot hold: the bytes of
        the last checkpoint (a save replaces it, and model_best.pth.tar, each through a temporary
        file), or before the first save, which adds both files, twice the bytes of the weights and
        the optimizer's state."""
        problem = None
        if self.info.is_main:
            if os.path.isfile(self.path):
                needed = os.path.getsize(self.path)
            else:
                needed = 2 * (tensor_bytes(student.state_dict()) + OPTIMIZER_STATES[optimizer_name] * sum(
                    p.numel() * p.element_size() for p in student.parameters()))
            free = shutil.disk_usage(self.folder).free
            if free < needed:
                problem = (f"{self.folder} has {size_in_mb(free)} free and a checkpoint needs about "
                           f"{size_in_mb(needed)}: free space there or pass another --save; stopped before "
                           "training an epoch that could not be saved")
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
                "unvalidated": state.unvalidated,
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


def init_checkpoint_file(path: str, log) -> str:
    """--init-checkpoint as given, or the model_best.pth.tar of the folder it names (said so)."""
    best = os.path.join(path, BEST)
    if os.path.isdir(path) and os.path.isfile(best):
        log(f"=> --init-checkpoint {path} is a folder: step 2 starts from its {BEST}")
        return best
    return path


def load_init_checkpoint(student: nn.Module, path: str, log) -> None:
    """Load the weights step 2 starts from, step 1's best model (--init-checkpoint, a file: see
    init_checkpoint_file), strictly into `student`."""
    if os.path.isdir(path):
        raise CheckpointError(f"--init-checkpoint {path} is a folder without a {BEST}: pass the step-1 checkpoint "
                              f"file, step 1's --save folder's {BEST}")
    if not os.path.isfile(path):
        raise CheckpointError(f"step 2 starts from a step-1 checkpoint and {path} does not exist: run step 1 "
                              "first (bash step1/run.sh) or pass --init-checkpoint PATH")
    obj = read_checkpoint(path)
    if checkpoint_step(obj) == 2:
        raise CheckpointError(f"{path} is a step-2 checkpoint; step 2 starts from step 1's model_best.pth.tar "
                              "(pass it with --init-checkpoint)")
    check_classes(path, num_classes(detect_format(obj)[1], path), student.fc.out_features,
                  "step 2 trains on the classes of its step-1 checkpoint")
    fmt = load_weights(student, obj)
    check_finite(student.state_dict(), path)
    epoch = f", epoch {obj['epoch']}, best val Acc@1 {format_top1(obj.get('best_top1_acc'))}" \
        if isinstance(obj, dict) and "epoch" in obj else ""
    log(f"=> step 2 starts from {path} ({fmt}{epoch})")


def format_top1(top1) -> str:
    """A best val Acc@1 in the log: none before the first validation."""
    return "none yet" if top1 is None else f"{top1:.3f}"
