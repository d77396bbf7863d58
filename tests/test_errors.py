"""Each bad input stops with a one-line message saying what is wrong and what to do."""
import os
import shutil
import urllib.error

import pytest
import torch

import evaluate
from tests.tiny import make_checkpoint, make_teacher, step
from utils import train
from utils.distill import build_teacher
from utils.errors import UserError


@pytest.fixture(scope="module")
def tiny(tiny_run):
    return tiny_run(train_per_class=1, val_per_class=1)


def error_of(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def train_args(data, save, teacher, *extra):
    return ["--step", "1", "--data", str(data), "--save", str(save), "--epochs", "1",
            "--batch_size", "2", "-j", "0", "--input-size", "32", *extra] + \
        (["--teacher-weights", str(teacher)] if teacher else [])


def test_data_folder_problems(tiny, tmp_path, capsys):
    data, teacher = tiny.data, tiny.teacher
    save = tmp_path / "save"
    assert "does not exist" in error_of(train.main, train_args(tmp_path / "nowhere", save, teacher), capsys)
    no_val = tmp_path / "no_val"
    shutil.copytree(os.path.join(data, "train"), no_val / "train")
    assert "has no val/ folder" in error_of(train.main, train_args(no_val, save, teacher), capsys)
    no_train = tmp_path / "no_train"
    shutil.copytree(os.path.join(data, "val"), no_train / "val")
    assert "has no train/ folder" in error_of(train.main, train_args(no_train, save, teacher), capsys)
    empty = tmp_path / "empty"
    (empty / "train" / "class0").mkdir(parents=True)
    (empty / "val").mkdir()
    assert "holds no images" in error_of(train.main, train_args(empty, save, teacher), capsys)
    assert "no data" in error_of(train.main, ["--step", "1", "--save", str(save)], capsys)
    assert not save.exists()  # nothing written for a run that cannot start
    assert "has no val/ folder" in error_of(
        evaluate.main, ["--checkpoint", teacher, "--data", str(no_val)], capsys)


def save_repo_checkpoint(path, step, num_classes=3):
    return make_checkpoint(path, step, num_classes, epoch=1, arch="reactnet_a", best_top1_acc=0.0,
                           args={"optimizer": "adam"})


def test_checkpoint_problems(tiny, tmp_path, capsys):
    data, teacher = tiny.data, tiny.teacher
    args = train_args(data, tmp_path / "s2", teacher)
    args[1] = "2"
    missing = tmp_path / "nope" / "model_best.pth.tar"
    err = error_of(train.main, args + ["--init-checkpoint", str(missing)], capsys)
    assert str(missing) in err and "run step 1 first" in err and "--init-checkpoint" in err

    step2 = save_repo_checkpoint(tmp_path / "step2.pth.tar", 2)
    assert "is a step-2 checkpoint" in error_of(train.main, args + ["--init-checkpoint", step2], capsys)

    five = save_repo_checkpoint(tmp_path / "five.pth.tar", 1, num_classes=5)
    err = error_of(train.main, args + ["--init-checkpoint", five], capsys)
    assert f"{five} has 5 classes but the data has 3: step 2 trains on the classes of its step-1 checkpoint" in err

    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(open(step2, "rb").read(100_000))
    err = error_of(train.main, args + ["--init-checkpoint", str(truncated)], capsys)
    assert str(truncated) in err and "corrupt" in err

    # A --save folder holding the other step's checkpoint is not resumed.
    assert not (tmp_path / "s2").exists()  # nothing written for a run that cannot start
    os.makedirs(tmp_path / "s2")
    save_repo_checkpoint(tmp_path / "s2" / "checkpoint.pth.tar", 1)
    assert "is a step-1 checkpoint, this is step 2" in error_of(train.main, args, capsys)

    # evaluate.py: missing file, wrong class count, contradicting --step
    assert "not found" in error_of(
        evaluate.main, ["--checkpoint", str(missing), "--data", data], capsys)
    assert f"{five} has 5 classes but the data has 3: pass --data with the 5 classes" in error_of(
        evaluate.main, ["--checkpoint", five, "--data", data], capsys)
    assert "is a step-2 checkpoint, not step 1" in error_of(
        evaluate.main, ["--checkpoint", step2, "--data", data, "--step", "1"], capsys)


def test_teacher_problems(tiny, tmp_path, capsys):
    data = tiny.data
    save = tmp_path / "save"
    five = make_teacher(tmp_path / "teacher5.pth", num_classes=5)
    err = error_of(train.main, train_args(data, save, five), capsys)
    assert "has 5 classes but the data has 3" in err and "--teacher-weights" in err
    # The default teacher is a 1000-class ImageNet model.
    err = error_of(train.main, train_args(data, save, None), capsys)
    assert "has 1000 classes but the data has 3" in err and "--teacher-weights" in err


def test_offline_teacher_says_where_to_put_the_weights(tmp_path, monkeypatch):
    import torchvision.models._api as api

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(UserError) as e:
            build_teacher("resnet34", None, 1000, print)
    finally:
        torch.hub.set_dir(os.path.join(torch.hub._get_torch_home(), "hub"))
    msg = e.value.line()
    assert msg.startswith("error: could not fetch")
    assert os.path.join(str(tmp_path), "hub", "checkpoints", "resnet34-b627a593.pth") in msg
    assert "--teacher-weights" in msg and "TORCH_HOME/hub/checkpoints" in msg


def test_uneven_batch_split_through_run_sh(tiny, tmp_path):
    """Two processes through torchrun: one clean message, no launcher traceback."""
    data, teacher = tiny.data, tiny.teacher
    p = step(1, data, tmp_path / "save", "--batch_size", "5", "--teacher-weights", teacher,
             check=False, NPROC_PER_NODE="2")
    assert p.returncode == 1
    assert "--batch_size 5 (global) does not split evenly over 2 processes" in p.stderr
    assert p.stderr.count("error:") == 1 and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "save").exists()


def test_evaluate_flag_errors(tiny, tmp_path, capsys):
    root, data, teacher = tiny.root, tiny.data, tiny.teacher
    a_file = tmp_path / "file"
    a_file.write_text("")
    for flags, message in [(["-j", "-1"], "-j/--workers must be at least 0, got -1"),
                           (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
                           (["--batch-size", "0"], "--batch_size must be at least 1, got 0"),
                           (["--input-size", "0"], "--input-size must be at least 32, got 0"),
                           (["--input_size", "40"], "--input-size 40 is not a multiple of 32"),
                           (["--print-freq", "0"], "--print-freq must be at least 1, got 0"),
                           (["--results-file", str(tmp_path)], f"--results-file {tmp_path} names a folder: give a "
                            f"file's path, e.g. {tmp_path / 'results.jsonl'}"),
                           (["--results-file", str(a_file / "r.jsonl")], f"--results-file {a_file / 'r.jsonl'}: "
                            f"{a_file} is not a folder this user can write to")]:
        # Before anything is read: the checkpoint (a teacher's weights) would be refused.
        assert message in error_of(evaluate.main, ["--checkpoint", teacher, "--data", data, *flags], capsys)
    assert a_file.read_text() == ""
    assert f"{str(root)!r} is a folder, not a checkpoint file" in error_of(
        evaluate.main, ["--checkpoint", str(root), "--data", data], capsys)
