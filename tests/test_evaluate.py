"""evaluate.py scores what it is given and says how: class folders by name, as class indices or
by --class-map, a subset of the classes over all of them or among the present ones, ImageNet-ReaL
labels matched by file name; the same for a packed file and for two processes.

The networks' answers are known: every block passes its input on unchanged (the BatchNorms after
the binary convs are 0, the shifts 0, the PReLU slopes 1), the stem's first channel averages the
red channel, and the classifier picks the class whose grey level is nearest to the image's, among
the classes given one. The images are solid greys, so each image's ranking of the classes is that
of their levels' distances to its own: the expected figures below are counted by hand."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import evaluate
from models import reactnet_a
from models.binary import LearnableBias
from tests.tiny import ROOT, run
from utils.classes import imagenet_classes, map_classes
from utils.data import IMAGENET_MEAN, IMAGENET_STD
from utils.errors import DataError
from utils.export import export
from utils.real_labels import labels_of_images

# The grey level each class of the 1000-class network answers to; class 3 has no folder (absent).
LEVELS = {0: 20, 1: 60, 2: 100, 3: 120, 10: 160, 100: 200, 999: 240}
# Folder (class) -> its images: (validation image number, the class whose grey it has).
IMAGES = {0: [(5, 0), (2, 0)], 1: [(9, 1)], 2: [(1, 2), (7, 3)], 10: [(4, 10)], 100: [(8, 100)],
          999: [(3, 999), (6, 0)]}
# ImageNet-ReaL's labels of validation images 1..10 (10 has no file).
REAL = [[2, 3], [100], [999, 100], [10], [0], [], [3], [999], [], [5]]
TINY = ["--input-size", "32", "-j", "0", "--batch_size", "16"]  # one batch: one forward in this process


def colour_model(levels: dict, num_classes: int) -> nn.Module:
    """The step-2 network of the module docstring: class c answers to grey levels[c]."""
    torch.manual_seed(0)
    model = reactnet_a(binary_weights=True, num_classes=num_classes).eval()
    with torch.no_grad():
        for module in model.feature[1:].modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.zero_()
                module.bias.zero_()
            elif isinstance(module, LearnableBias):
                module.bias.zero_()
            elif isinstance(module, nn.PReLU):
                module.weight.fill_(1)
        stem = model.feature[0].conv1.weight
        stem.zero_()
        stem[0, 0] = 1 / 9
        grey = torch.tensor(list(levels.values()), dtype=torch.float32).view(-1, 1, 1, 1) / 255
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        centre = model.features(((grey - mean) / std).expand(-1, 3, 32, 32))[:, 0]
        model.fc.weight.zero_()
        model.fc.bias.fill_(-1e4)  # the classes without a level: never in the top 5
        for c, f in zip(levels, centre):  # -(x - f)^2 up to the same -x^2 for every class
            model.fc.weight[c, 0], model.fc.bias[c] = 2 * f, -f * f
    return model


def make_val(root, folders: dict, levels: dict) -> str:
    """root/val/<folder>/ILSVRC2012_val_<number>.png, solid greys; `folders`: name -> [(number, class)]."""
    for name, images in folders.items():
        os.makedirs(os.path.join(root, "val", str(name)), exist_ok=True)
        for number, c in images:
            pixels = np.full((32, 32, 3), levels[c], dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, "val", str(name), f"ILSVRC2012_val_{number:08d}.png"))
    return str(root)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The 1000-class network in the AdamBNN release's layout (no class names recorded), its packed
    file, its data with wnid and with numeric folders, and real.json."""
    root = tmp_path_factory.mktemp("evaluate")
    model = colour_model(LEVELS, 1000)
    released = root / "released.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, released)
    wnids = make_val(root / "wnids", {imagenet_classes()[c]: images for c, images in IMAGES.items()}, LEVELS)
    numbers = make_val(root / "numbers", IMAGES, LEVELS)
    (root / "real.json").write_text(json.dumps(REAL))
    return {"root": root, "released": str(released), "wnids": wnids, "numbers": numbers,
            "real": str(root / "real.json")}


def evaluated(capsys, checkpoint, data, *flags, results=None) -> tuple:
    """(the results file's row or None, the printed lines) of evaluate.py in this process."""
    written = ["--results-file", results] if results else []
    evaluate.main([str(a) for a in ["--checkpoint", checkpoint, "--data", data, *TINY, *written, *flags]])
    row = json.loads(open(results).readlines()[-1]) if results else None
    return row, capsys.readouterr().out.splitlines()


def accuracy(right1: int, right5: int, images: int, real="") -> str:
    """The accuracy line of `right1` and `right5` right of `images`."""
    return f"* {real}Acc@1 {100 * right1 / images:.3f} Acc@5 {100 * right5 / images:.3f}"


def refused(capsys, checkpoint, data, *flags) -> str:
    """The one-line error of evaluate.py, which exits 1 before any accuracy."""
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(a) for a in ["--checkpoint", checkpoint, "--data", data, *TINY, *flags]])
    out, err = capsys.readouterr()
    assert e.value.code == 1 and "Acc@1" not in out and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_folders_are_the_recorded_classes_by_name_and_renamed_ones_are_refused(tmp_path, capsys):
    levels = {0: 40, 1: 130, 2: 220}
    checkpoint = str(tmp_path / "three.pth.tar")
    torch.save({"step": 2, "state_dict": colour_model(levels, 3).state_dict(),
                "classes": ["class0", "class1", "class2"]}, checkpoint)
    images = {0: [(1, 0), (2, 0), (3, 0)], 1: [(4, 1), (5, 0)], 2: [(6, 2), (7, 2)]}  # 6 of 7 right
    named = make_val(tmp_path / "named", {f"class{c}": v for c, v in images.items()}, levels)
    _, out = evaluated(capsys, checkpoint, named)
    assert out[1:] == ["=> classes: folders by name, the classes the checkpoint records; 3 of its 3 classes "
                       "present, scored among all 3", accuracy(6, 7, 7)]
    # Renamed: z, a, m hold class0, class1, class2 (in sorted order they would be 1, 2, 0: 1 of 7 right).
    renamed = make_val(tmp_path / "renamed", {name: images[c] for name, c in (("z", 0), ("a", 1), ("m", 2))}, levels)
    err = refused(capsys, checkpoint, renamed)
    assert f"3 of the 3 class folders of {renamed}/val are not classes of {checkpoint} (a, m, z): it records " \
           "its classes: class0, class1, class2; rename the folders to its classes, or pass --class-map FILE" in err
    (tmp_path / "map.txt").write_text("z\na\nm\n")
    _, out = evaluated(capsys, checkpoint, renamed, "--class-map", tmp_path / "map.txt")
    assert out[1:] == [f"=> classes: folders mapped by --class-map {tmp_path}/map.txt; 3 of its 3 classes present, "
                       "scored among all 3", accuracy(6, 7, 7)]


def test_imagenet_folders_by_wnid_and_by_index_give_the_same_figures(files, tmp_path, capsys):
    # Right at top 1: 7 of 9 (not image 7, class 3's grey in folder 2, nor image 6, class 0's grey
    # in folder 999); at top 5: 8 of 9 (class 0's grey's 5 nearest are 0, 1, 2, 3, 10: not 999).
    row, out = evaluated(capsys, files["released"], files["wnids"], results=tmp_path / "r.jsonl")
    assert out[1:] == ["=> classes: folders by name, ImageNet-1k's wnids in sorted order (the checkpoint records no "
                       "class names); 6 of its 1000 classes present, scored among all 1000", accuracy(7, 8, 9)]
    assert {k: row[k] for k in ("data", "classes", "num_classes", "present_classes", "protocol", "images")} == {
        "data": f"{files['wnids']}/val", "classes": "folders by name, ImageNet-1k's wnids in sorted order (the "
        "checkpoint records no class names)", "num_classes": 1000, "present_classes": 6, "protocol": "all classes",
        "images": 9}
    assert (row["top1"], row["top5"]) == (pytest.approx(100 * 7 / 9), pytest.approx(100 * 8 / 9))
    # Numeric folders: 0, 1, 10, 100, 2, 999 in sorted order, the classes of their numbers.
    _, out = evaluated(capsys, files["released"], files["numbers"])
    assert out[1:] == ["=> classes: folders are class indices 0..999; 6 of its 1000 classes present, scored among "
                       "all 1000", accuracy(7, 8, 9)]
    # Folders that are neither wnids nor indices, or indices past the classes, are refused.
    shutil.copytree(files["wnids"], tmp_path / "named")
    os.rename(tmp_path / "named" / "val" / imagenet_classes()[1], tmp_path / "named" / "val" / "goldfish")
    err = refused(capsys, files["released"], tmp_path / "named")
    assert f"1 of the 6 class folders of {tmp_path}/named/val are not classes of {files['released']} (goldfish): " \
           "it records no class names, so its classes are ImageNet-1k's wnids in sorted order: n01440764, " \
           "n01443537, n01484850 (+997 more); rename the folders to its classes, or pass --class-map FILE" in err
    with pytest.raises(DataError, match=r"class folders 1000 of the data are numbers past the class indices of "
                                        r"the checkpoint \(0\.\.999\)"):
        map_classes(["0", "1000"], 1000)
    assert map_classes(["01", "1"], 1000, class_map=["1", "01"]).targets == [1, 0]


def test_a_subset_of_the_classes_is_scored_over_all_of_them_or_among_the_present_ones(files, capsys):
    # Over all classes: the figures above. Among the present ones (not 3), image 7 (class 3's grey)
    # is class 2's, its folder's: 8 of 9 at top 1; class 0's grey's 5 nearest present classes still
    # leave out 999: 8 of 9 at top 5.
    _, out = evaluated(capsys, files["released"], files["wnids"], "--present-classes-only")
    assert out[1:] == ["=> classes: folders by name, ImageNet-1k's wnids in sorted order (the checkpoint records no "
                       "class names); 6 of its 1000 classes present, scored among the 6 present "
                       "(--present-classes-only)", accuracy(8, 8, 9)]


def test_real_labels_are_matched_by_file_name_and_count_labelled_images_only(files, tmp_path, capsys):
    # Images 6 and 9 have no labels; of the 7 others, the top 1 is a label for 1, 3, 4, 5 and 7 (not
    # for 2: class 0's grey, labels [100]; nor 8: class 100's, labels [999]); the top 5 for all but 2.
    _, out = evaluated(capsys, files["released"], files["wnids"], "--real-labels", files["real"])
    assert out[2:] == [accuracy(7, 8, 9), accuracy(5, 6, 7, real="ReaL ") + " (7 of the 9 images have ReaL labels)"]
    # A list that does not reach the folder's images, a file not named as a validation image, or an
    # image twice: refused before the pass.
    (tmp_path / "short.json").write_text(json.dumps(REAL[:8]))
    assert f"ILSVRC2012_val_00000009.png is validation image 9, but --real-labels {tmp_path}/short.json has labels " \
           "for images 1..8: the list does not fit the folder" in refused(
               capsys, files["released"], files["wnids"], "--real-labels", tmp_path / "short.json")
    with pytest.raises(DataError, match="is not named as an ImageNet validation image"):
        labels_of_images(["val/n01440764/photo.png"], REAL, "real.json")
    with pytest.raises(DataError, match="are both validation image 2"):
        labels_of_images(["a/ILSVRC2012_val_00000002.JPEG", "b/ILSVRC2012_val_00000002.png"], REAL, "real.json")


def test_packed_file_and_two_processes_give_the_float_figures(files, tmp_path, capsys):
    """Every figure, with ReaL labels among the present classes: image 7 (class 3's grey, label 3)
    is now class 2's, wrong at top 1 and 5; image 2's 5 nearest present classes (class 0's grey)
    take in its label 100 (4 of 7 right at top 1, 6 of 7 at top 5)."""
    packed = str(tmp_path / "packed.pt")
    export(files["released"], packed)
    flags = ["--real-labels", files["real"], "--present-classes-only"]
    rows = {}
    for name, checkpoint in (("float", files["released"]), ("packed", packed)):
        rows[name], _ = evaluated(capsys, checkpoint, files["wnids"], *flags, results=tmp_path / f"{name}.jsonl")
    # Shards of 5 and 4 images, in batches of 2: ReaL's labels follow each process's images.
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(ROOT, "evaluate.py"), "--checkpoint", packed, "--data", files["wnids"], *TINY, "--batch_size",
         "4", *flags, "--results-file", tmp_path / "two.jsonl"], OMP_NUM_THREADS="1")
    rows["two processes"] = json.loads((tmp_path / "two.jsonl").read_text())
    expected = {"top1": pytest.approx(100 * 8 / 9), "top5": pytest.approx(100 * 8 / 9), "images": 9,
                "real_top1": pytest.approx(100 * 4 / 7), "real_top5": pytest.approx(100 * 6 / 7), "real_images": 7,
                "present_classes": 6, "protocol": "present classes only", "loss": pytest.approx(rows["float"]["loss"]),
                "real_labels": files["real"], "data": f"{files['wnids']}/val"}
    for name, row in rows.items():
        assert {k: row[k] for k in expected} == expected, name
