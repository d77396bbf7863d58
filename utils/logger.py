"""Progress lines (training's and validation's), TensorBoard scalars, JSON lines, and the run's
arguments and code version. Every line goes through `printable`: a file name that is not UTF-8
prints too.

Only rank 0 logs: on other ranks `RunLogger` is built with `enabled=False` and does nothing
(their errors reach log.txt through `append_line`).
"""
import datetime
import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# log.jsonl key -> TensorBoard tag
TENSORBOARD_TAGS = {"lr": "train/lr", "train_loss": "train/loss", "train_top1": "train/acc1",
                    "train_top5": "train/acc5", "images_per_s": "train/images_per_s",
                    "val_loss": "val/loss", "val_top1": "val/acc1", "val_top5": "val/acc5"}


class AverageMeter:
    """Current value and running average, printed as the original: 'Time  0.123 ( 0.456)'."""

    def __init__(self, name, fmt=":f"):
        self.name, self.fmt = name, fmt
        self.val = self.sum = self.count = self.avg = 0.0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count

    def __str__(self):
        return ("{name} {val" + self.fmt + "} ({avg" + self.fmt + "})").format(**self.__dict__)


def _pair(name, fmt, pair):
    return ("{} {" + fmt + "} ({" + fmt + "})").format(name, *pair)


def _position(i, num_batches) -> str:
    return f"[{i:{len(str(num_batches))}d}/{num_batches}]"


def _speed(i, num_batches, batch_time, images_per_s) -> list:
    eta = datetime.timedelta(seconds=round(batch_time.avg * (num_batches - i - 1)))
    return [f"img/s {images_per_s:7.1f}", f"ETA {eta}"]


def progress_line(epoch, i, num_batches, batch_time, data_time, loss, top1, top5, lr,
                  images_per_s) -> str:
    """The original's 'Epoch: [e][ i/n]  Time  Data  Loss  Acc@1  Acc@5' line (value and running
    average of each), then the learning rate, images/s (all processes) and the epoch's ETA."""
    return "\t".join([
        f"Epoch: [{epoch}]{_position(i, num_batches)}", str(batch_time), str(data_time),
        _pair("Loss", ":.4e", loss), _pair("Acc@1", ":6.2f", top1), _pair("Acc@5", ":6.2f", top5),
        f"lr {lr:.4e}", *_speed(i, num_batches, batch_time, images_per_s)])


def validation_line(i, num_batches, batch_time, data_time, images_per_s) -> str:
    """A validation pass's progress: 'Test: [ i/n]  Time  Data', images/s (all processes) and the
    pass's ETA. No accuracy: reading it would wait for the device, and a sorted validation set's
    first batches are its first classes only."""
    return "\t".join([f"Test: {_position(i, num_batches)}", str(batch_time), str(data_time),
                      *_speed(i, num_batches, batch_time, images_per_s)])


def printable(text: str) -> str:
    """`text` with the bytes of a path that are not UTF-8 (surrogate-escaped by Python) written as
    \\xNN, as bash's $'...' reads them: any file name the file system holds can be printed."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def append_line(path: str, line: str) -> None:
    """Append one line to a text file (an error of any process to its run's log.txt)."""
    with open(path, "a") as f:
        f.write(printable(line) + "\n")


def git_commit() -> str:
    """The code's git commit, with '-dirty' when the work tree has uncommitted changes."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                        timeout=10, check=True).stdout.strip()
        commit = run("rev-parse", "HEAD")
        return commit + ("-dirty" if run("status", "--porcelain") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def read_records(path: str) -> tuple[list, list]:
    """The records of a log.jsonl (JSON objects, one a line), and the lines that are none (bytes)."""
    records, damaged = [], []
    with open(path, "rb") as f:
        for line in filter(bytes.strip, f):
            try:
                record = json.loads(line)
            except ValueError:  # a cut-off line, or bytes that are not UTF-8
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                damaged.append(line)
    return records, damaged


class RunLogger:
    """Everything a run writes besides checkpoints, all under its --save folder:
    log.txt (the console output), log.jsonl (one JSON object per epoch), args.json and
    tensorboard/ (event files). Nothing is written before `open()`, so that a run stopped by a
    bad input leaves no folder behind; lines logged before it go to log.txt then."""

    def __init__(self, save_dir: str, enabled: bool = True):
        self.enabled, self.save_dir = enabled, save_dir
        self.writer, self._file, self._pending = None, None, []

    def open(self):
        if not self.enabled or self._file is not None:
            return
        os.makedirs(self.save_dir, exist_ok=True)
        self._file = open(os.path.join(self.save_dir, "log.txt"), "a", buffering=1)
        self._file.writelines(line + "\n" for line in self._pending)
        self._pending = []
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(self.save_dir, "tensorboard"))
        except ImportError:
            self.log("tensorboard is not installed: no TensorBoard events are written")

    def log(self, msg: str):
        if self.enabled:
            msg = printable(msg)
            print(msg, flush=True)
            if self._file is not None:
                self._file.write(msg + "\n")
            else:
                self._pending.append(msg)

    def save_args(self, args: dict, **extra):
        if self.enabled:
            with open(os.path.join(self.save_dir, "args.json"), "w") as f:
                json.dump({**args, **extra, "command": shlex.join(sys.argv)}, f, indent=2)

    def truncate_records(self, epochs_done: int):
        """On resume: forget the records of epochs after the checkpoint (a run killed between
        writing an epoch's record and its checkpoint trains that epoch again). A line that is not
        a record (cut off by a crash mid-write) is moved to log.jsonl.damaged, and said so."""
        path = os.path.join(self.save_dir, "log.jsonl")
        if self.enabled and os.path.isfile(path):
            records, damaged = read_records(path)
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records if r.get("epoch", -1) < epochs_done)
            if damaged:
                with open(path + ".damaged", "ab") as f:
                    f.writelines(line.rstrip(b"\n") + b"\n" for line in damaged)
                self.log(f"=> {len(damaged)} damaged line(s) of {path} (cut off by a crash mid-write?) moved to "
                         f"{path}.damaged; the other records are kept")

    def log_epoch(self, line: str, record: dict, analysis: dict):
        """An epoch's end: `line` to the console and log.txt, `record` and the `analysis` metrics
        as one JSON line of log.jsonl, and both to TensorBoard (TENSORBOARD_TAGS, analysis/*)."""
        if not self.enabled:
            return
        self.log(line)
        with open(os.path.join(self.save_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps({**record, **analysis}) + "\n")
        if self.writer is not None:
            scalars = {**{TENSORBOARD_TAGS[k]: v for k, v in record.items() if k in TENSORBOARD_TAGS},
                       **{f"analysis/{k}": v for k, v in analysis.items()}}
            for tag, value in scalars.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(tag, value, record["epoch"])
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self._file is not None:
            self._file.close()
