"""The fixture factory of the tiny runs: data, a teacher of its classes and a finished step 1."""
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.tiny import make_checkpoint, make_image_folder, make_teacher


@dataclass
class Tiny:
    """What a tiny run trains on: `data` (an ImageFolder root with train/ and val/), `teacher` (a
    state_dict file of its classes), and `step1` (a finished step 1's checkpoint, random weights:
    what step 2 starts from) where asked for; all under `root`."""
    root: Path
    data: str
    teacher: str
    step1: str | None = None


@pytest.fixture(autouse=True)
def torch_threads():
    """torch's CPU thread count as it was before each test: an entry point run in the test's process
    (`python -m utils.export --threads 1`, say) sets it for the process, and the runs of later tests
    would then sum in another order than the same runs in a process of their own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`tiny_run(classes=3, train_per_class=4, val_per_class=3, step1=False)`: a new Tiny in a
    folder of its own (tests/tiny.py's make_image_folder, make_teacher, make_checkpoint)."""
    def make(classes=3, train_per_class=4, val_per_class=3, step1=False) -> Tiny:
        root = tmp_path_factory.mktemp("tiny")
        data = make_image_folder(root / "data", classes, train_per_class, val_per_class)
        teacher = make_teacher(root / "teacher.pth", num_classes=classes)
        init = make_checkpoint(root / "step1.pth.tar", step=1, num_classes=classes) if step1 else None
        return Tiny(root, data, teacher, init)
    return make
