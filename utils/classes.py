"""Which of a network's classes each class folder of an evaluation set holds.

A network's classes have names when its file records them (this repository's checkpoints and
packed files: the class folders it was trained on, in the order of its outputs), and a
1000-class network that records none (the released checkpoints) has ImageNet-1k's classes:
the 1000 wnids in sorted order (imagenet_classes.txt), the order of torchvision's ImageFolder
over ImageNet's train/ and val/. The folders are then, in this order of precedence:
- `--class-map FILE`: line k names the folder that holds class k (timm's class map);
- class names: each folder is the class of its name;
- class indices, folders named 0 ... N-1 (ImageNet-V2's layout);
- for a network whose class names are unknown (a bare state_dict of other than 1000 classes),
  folder k in sorted order is class k, as in training, where there are as many folders as
  classes.
Anything else is refused, naming a few of the folders and the way out. The folders may hold only
some of the classes (ImageNet-A and -R: 200 of ImageNet's 1000).
"""
import collections
import functools
import os
from dataclasses import dataclass

from .checkpoint import check_classes
from .errors import CheckpointError, ConfigError, DataError, first_few

__all__ = ["imagenet_classes", "ClassMapping", "read_class_map", "map_classes", "class_names", "relabel"]

_SHOW = 3  # folders named in a message


@functools.cache
def imagenet_classes() -> list:
    """ImageNet-1k's 1000 wnids in sorted order: the classes of the released checkpoints."""
    with open(os.path.join(os.path.dirname(__file__), "imagenet_classes.txt")) as f:
        return f.read().split()


@dataclass
class ClassMapping:
    """`targets[i]`: the network's class of folder i (in sorted folder order); `how`: how the
    folders were mapped, as printed and recorded."""
    targets: list
    how: str

    @property
    def present(self) -> list:
        """The network's classes that some folder holds, in class order."""
        return sorted(set(self.targets))


def read_class_map(path: str) -> list:
    """The folder names of a --class-map file, one per line (line k: the folder of class k)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--class-map {path} does not exist: give a text file with one line per class, "
                          "line k the folder that holds class k")
    with open(path) as f:
        names = [line.strip() for line in f.read().splitlines()]
    empty = [k + 1 for k, name in enumerate(names) if not name]
    repeated = sorted(name for name, n in collections.Counter(names).items() if n > 1)
    if not names or empty or repeated:
        problem = "is empty" if not names else (f"has empty lines ({first_few(empty, _SHOW)})" if empty else
                                                 f"names folders more than once ({first_few(repeated, _SHOW)})")
        raise ConfigError(f"--class-map {path} {problem}: one folder name per line, line k the folder of class k")
    return names


def map_classes(folders: list, num_classes: int, recorded=None, class_map=None, *, what="the checkpoint",
                where="the data", class_map_path="FILE") -> ClassMapping:
    """The mapping of `folders` (sorted, as ImageFolder finds them) onto a network of
    `num_classes` classes whose file records `recorded` (class names, or None), by the rules of
    the module docstring; `class_map`: read_class_map's names. `what` names the network's file
    and `where` the data folder in errors."""
    way_out = "or pass --class-map FILE (line k: the folder of class k) to map them"
    if class_map is not None:
        if len(class_map) > num_classes:
            raise ConfigError(f"--class-map {class_map_path} has {len(class_map)} lines but {what} has "
                              f"{num_classes} classes")
        index = {name: k for k, name in enumerate(class_map)}
        unmapped = [f for f in folders if f not in index]
        if unmapped:
            raise DataError(f"{len(unmapped)} class folder(s) of {where} are not in --class-map {class_map_path} "
                            f"({first_few(unmapped, _SHOW)}): add a line for each class they hold")
        return ClassMapping([index[f] for f in folders], f"folders mapped by --class-map {class_map_path}")
    names, how, listing = class_names(recorded, num_classes, what)
    if names is not None:
        index = {name: k for k, name in enumerate(names)}
        if all(f in index for f in folders):
            return ClassMapping([index[f] for f in folders], how)
    indices = _as_indices(folders)
    if indices is not None:
        past = [f for f, k in zip(folders, indices) if k >= num_classes]
        if past:
            raise DataError(f"class folders {first_few(past, _SHOW)} of {where} are numbers past the class indices of "
                            f"{what} (0..{num_classes - 1}): remove them, {way_out}")
        return ClassMapping(indices, f"folders are class indices 0..{num_classes - 1}")
    if names is not None:
        unknown = [f for f in folders if f not in index]
        raise DataError(f"{len(unknown)} of the {len(folders)} class folders of {where} are not classes of {what} "
                        f"({first_few(unknown, _SHOW)}): {listing}: {first_few(names, _SHOW)}; rename the folders to "
                        f"its classes, {way_out}")
    check_classes(what, num_classes, len(folders), f"pass --data with the {num_classes} classes it was trained on "
                  f"(it records no class names: folder k in sorted order is class k), {way_out}", DataError)
    return ClassMapping(list(range(num_classes)),
                        "folder k in sorted order is class k (the checkpoint records no class names)")


def class_names(recorded, num_classes: int, what="the checkpoint") -> tuple:
    """(the network's class names, how folders map onto them, what they are), or (None, '', '')
    when they are unknown."""
    if recorded is not None:
        if len(recorded) != num_classes:
            raise CheckpointError(f"{what} records {len(recorded)} class names for its {num_classes} outputs: "
                                  "the file is damaged")
        return list(recorded), "folders by name, the classes the checkpoint records", "it records its classes"
    if num_classes == len(imagenet_classes()):
        return (imagenet_classes(), "folders by name, ImageNet-1k's wnids in sorted order (the checkpoint records "
                "no class names)", "it records no class names, so its classes are ImageNet-1k's wnids in sorted order")
    return None, "", ""


def _as_indices(folders: list) -> list | None:
    """The folders as class indices when each is a number written plainly (0, 1, ... 999)."""
    if all(f.isdecimal() and f.isascii() and str(int(f)) == f for f in folders):
        return [int(f) for f in folders]
    return None


def relabel(dataset, targets: list) -> None:
    """Make an ImageFolder's targets the network's classes: folder i's images become class
    `targets[i]`."""
    dataset.samples = [(path, targets[i]) for path, i in dataset.samples]
    dataset.imgs = dataset.samples
    dataset.targets = [t for _, t in dataset.samples]
