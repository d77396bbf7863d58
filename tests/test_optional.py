"""Without the optional packages, as in an environment that has its own torch and did not install
them: the torch data backend without TorchCodec is refused in one line before anything starts
(training, evaluate.py, the benchmark that needs it), and the CUDA tier still collects with
torch, torchvision, numpy, Pillow and pytest alone. What runs without TorchCodec: the pipeline of
tests/test_pipeline.py; without matplotlib: tests/test_analysis.py; without a C++ compiler:
tests/test_kernel.py."""
import os
import sys

import pytest
import torch

from tests.tiny import ROOT, run, step, without
from utils import torch_data
from utils.bench.__main__ import main as bench

# What the CUDA tier needs is torch, torchvision, numpy, Pillow and pytest: the rest is blocked.
OPTIONAL = ("torchcodec", "tensorboard", "sklearn", "matplotlib", "jsonschema", "yaml", "onnx", "onnxruntime",
            "onnxscript")
NO_TORCHCODEC = ("the torch data backend (--data-backend torch) decodes with TorchCodec, which does not import "
                 "here (ModuleNotFoundError: No module named 'torchcodec'): pip install " + torch_data.TORCHCODEC)


def test_the_torch_backend_without_torchcodec_is_refused_in_one_line_before_anything_starts(tmp_path):
    blocked = without(tmp_path / "blocked", "torchcodec")
    save = tmp_path / "save"
    training = step(1, tmp_path / "data", save, "--data-backend", "torch", check=False, PYTHONPATH=blocked)
    evaluation = run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint", tmp_path / "missing.pth.tar",
                      "--data", tmp_path / "data", "--data-backend", "torch"], check=False, PYTHONPATH=blocked)
    for p in (training, evaluation):
        assert p.returncode == 1 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
        assert p.stderr.startswith(f"error: {NO_TORCHCODEC} (TorchCodec 0.16 and later work with this torch, "
                                   f"{torch.__version__})"), p.stderr
    assert not save.exists()  # no process started: nothing was created


def test_the_benchmark_that_needs_torchcodec_says_so_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch_data, "decode_jpeg", None)  # as where `import torchcodec` failed
    monkeypatch.setattr(torch_data, "_decoder_error", ModuleNotFoundError("No module named 'torchcodec'"))
    with pytest.raises(SystemExit) as e:
        bench(["end-to-end", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith(f"error: {NO_TORCHCODEC}") and err.count("\n") == 1, err


def test_the_cuda_tier_collects_with_torch_torchvision_numpy_pillow_and_pytest_alone(tmp_path):
    p = run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", "-m", "cuda", "tests"],
            check=False, PYTHONPATH=without(tmp_path / "blocked", *OPTIONAL))
    assert p.returncode == 0, p.stdout[-3000:]
    collected = [line for line in p.stdout.splitlines() if "::" in line]
    assert collected and all(line.startswith("tests/test_cuda.py::") for line in collected), p.stdout[-3000:]
