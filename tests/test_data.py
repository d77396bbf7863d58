"""The one-image last batch of one process: at --input-size 32 (1x1 last feature maps) BatchNorm
cannot train on one image, so build_loader leaves such a batch out, says so once, and a run stopped
in that epoch resumes over the same shortened epoch. (Two processes: tests/test_distributed.py.)"""
import json
import signal
import subprocess

from tests.tiny import ROOT, env, run, step_command, wait_for_line
from utils.checkpoint import read_checkpoint
from utils.preempt import EXIT_PREEMPTED

LEFT_OUT = "it is left out, 1 image(s) an epoch"


def test_one_image_last_batch_is_left_out_and_its_epoch_resumes(tiny_run, tmp_path):
    # 10 training images in batches of 3: 3, 3, 3 and a last one of 1, left out.
    tiny = tiny_run(classes=2, train_per_class=5, val_per_class=1)
    data, teacher = tiny.data, tiny.teacher
    save = tmp_path / "save"
    cmd = step_command(1, data, save, "--teacher-weights", teacher, "--batch_size", "3")
    # One thread: batches of 3 gain nothing from more, and OpenMP's waits slow down on a busy machine.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = wait_for_line(proc, "Epoch: [0][0/3]")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert (seen + out).count(LEFT_OUT) == 1
    stopped_at = read_checkpoint(save / "checkpoint.pth.tar")["iteration"]
    assert stopped_at in (1, 2)

    p = run(cmd, OMP_NUM_THREADS="1")  # the same command again
    assert p.stdout.count(LEFT_OUT) == 1 and f"{stopped_at} iterations of epoch 0 done" in p.stdout
    assert "Epoch: [0][2/3]" in p.stdout and "Epoch: [0][3/" not in p.stdout
    (record,) = [json.loads(line) for line in open(save / "log.jsonl")]
    assert round(record["images_per_s"] * record["epoch_time"]) == 9  # the epoch's images, both launches
