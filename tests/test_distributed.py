"""Two processes through torchrun on CPU (gloo): the DDP run ends with identical weights on both
ranks, only rank 0 prints and writes, and validation counts each image exactly once; a last batch
of one image per process is left out on both; evaluate.py's errors come from every rank."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import evaluate
from tests.tiny import ROOT, env, free_port, make_image_folder, records, run, step

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def ddp_run(tiny_run):
    # 9 validation images: shards of 5 and 4.
    tiny = tiny_run(classes=3, train_per_class=4, val_per_class=3)
    root, data, teacher = tiny.root, tiny.data, tiny.teacher
    dumps = root / "dumps"
    dumps.mkdir()
    p = run([*TORCHRUN, "-m", "tests.tiny", dumps, "--step", "1", "--data", data, "--save", root / "save",
             "--teacher-weights", teacher, "--epochs", "2", "--batch_size", "4", "-j", "0",
             "--input-size", "32", "--print-freq", "1", "--deterministic"],
            PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return root, data, p


def test_ranks_end_with_identical_weights(ddp_run):
    root, _, _ = ddp_run
    r0 = torch.load(root / "dumps" / "rank0.pth", weights_only=True)
    r1 = torch.load(root / "dumps" / "rank1.pth", weights_only=True)
    assert r0.keys() == r1.keys()
    for k in r0:  # parameters and BatchNorm buffers
        assert torch.equal(r0[k], r1[k]), k
    saved = torch.load(root / "save" / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], r0[k]) for k in r0)


def test_only_rank0_prints_and_writes(ddp_run):
    root, _, p = ddp_run
    assert len(re.findall(r"^\* Acc@1", p.stdout, re.M)) == 2
    assert p.stdout.count("=> data ") == 1 and "2 process(es) x batch 2" in p.stdout
    assert len(re.findall(r"^Epoch: \[0\]\[0/3\]", p.stdout, re.M)) == 1
    # Validation's progress: rank 0's shard of 5 images in 3 batches, each epoch (rank 1's has 2).
    assert re.findall(r"^Test: \[(\d/\d)\]", p.stdout, re.M) == ["0/3", "1/3", "2/3"] * 2
    assert sorted(os.listdir(root / "save")) == ["args.json", "checkpoint.pth.tar", "log.jsonl", "log.txt",
                                                  "model_best.pth.tar", "run.lock", "tensorboard"]
    assert len(os.listdir(root / "save" / "tensorboard")) == 1
    assert len(open(root / "save" / "log.jsonl").readlines()) == 2
    assert json.load(open(root / "save" / "args.json"))["world_size"] == 2


def test_validation_counts_each_image_once(ddp_run, tmp_path, capsys):
    root, data, _ = ddp_run
    last = records(root / "save")[-1]
    assert last["val_images"] == 9
    ckpt = str(root / "save" / "checkpoint.pth.tar")
    # The same checkpoint evaluated by one process, and by two through torchrun.
    single = evaluate.main(["--checkpoint", ckpt, "--data", data, "--input-size", "32", "-j", "0",
                            "--batch_size", "4"])
    assert single.count == 9 and single.top1 == pytest.approx(last["val_top1"])
    results = tmp_path / "r.jsonl"
    p = run([*TORCHRUN, os.path.join(ROOT, "evaluate.py"), "--checkpoint", ckpt, "--data", data,
             "--input-size", "32", "-j", "0", "--batch_size", "4", "--results-file", results, "--print-freq", "1"],
            OMP_NUM_THREADS="1")
    assert re.findall(r"^Test: \[(\d/\d)\]", p.stdout, re.M) == ["0/3", "1/3", "2/3"]  # rank 0's alone
    row = json.loads(results.read_text())
    assert row["images"] == 9 and row["top1"] == pytest.approx(single.top1)
    assert row["top5"] == pytest.approx(single.top5)


def test_one_image_last_batch_is_left_out_on_every_process(ddp_run, tmp_path):
    root, _, _ = ddp_run
    # 9 training images over 2 processes: shards of 5 (one padded), batches of 2, the last of 1.
    data = make_image_folder(tmp_path / "data", classes=3, train_per_class=3, val_per_class=1)
    p = step(1, data, tmp_path / "save", "--teacher-weights", root / "teacher.pth", NPROC_PER_NODE="2")
    assert p.stdout.count("left out, 2 image(s) an epoch") == 1
    assert "Epoch: [0][1/2]" in p.stdout and "Epoch: [0][2/" not in p.stdout
    (record,) = records(tmp_path / "save")
    assert round(record["images_per_s"] * record["epoch_time"]) == 8  # both processes' images


def test_evaluate_errors_come_from_every_rank(ddp_run, tmp_path):
    root, data, _ = ddp_run
    # The second image of the sorted validation set is in rank 1's shard (images 1, 3, 5...).
    shutil.copytree(data, tmp_path / "data")
    bad = tmp_path / "data" / "val" / "class0" / "1.png"
    bad.write_bytes(os.urandom(300))
    # The two processes in torchrun's environment, without torchrun: it stops the other workers as
    # soon as one fails, which could cut the slower one short before its line.
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint", str(root / "save" / "checkpoint.pth.tar"),
           "--data", str(tmp_path / "data"), "-j", "0", "--batch_size", "4"]
    rendezvous = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env(RANK=str(r), LOCAL_RANK=str(r), **rendezvous),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    rank0, rank1 = (p.communicate(timeout=300)[1].strip() for p in procs)
    assert [p.returncode for p in procs] == [1, 1]
    for rank, line in enumerate((rank0, rank1)):  # each names the file, whichever prints first
        assert line.startswith(f"[rank {rank}/2] error: 1 validation image(s) unreadable, e.g. {bad} (") and \
            "cannot identify image file" in line and "\n" not in line, line
