"""The float step-2 network in ONNX: both of torch's exporters write a file that ONNX Runtime runs
to PyTorch's logits."""
import pytest
import torch

from models import reactnet_a
from tests.test_export import RTOL, logits, max_rel_error, randomize

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in requirements.txt: pip install -r requirements.txt")
pytest.importorskip("onnxscript", reason="the dynamo exporter's onnxscript is in requirements.txt")


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning",
                            "ignore:The feature will be removed:DeprecationWarning")
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_the_float_network_exports_to_onnx_and_runs_in_onnx_runtime(tmp_path, dynamo):
    torch.manual_seed(0)
    model = randomize(reactnet_a(binary_weights=True, num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    expected = logits(model, x)
    path = tmp_path / "reactnet_a.onnx"
    torch.onnx.export(model, (x,), path, dynamo=dynamo, input_names=["images"], output_names=["logits"])
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (actual,) = session.run(["logits"], {"images": x.numpy()})
    actual = torch.from_numpy(actual)
    assert max_rel_error(actual, expected) < RTOL and torch.equal(actual.argmax(1), expected.argmax(1))
    assert torch.equal(logits(model, x), expected)  # exporting changed nothing
