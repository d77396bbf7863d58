"""ReActNet-A against the authors' code (tests/fixtures/reactnet_a_seed0.json), and the model's contract."""
import json
import os

import pytest
import torch

from models import reactnet_a

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "reactnet_a_seed0.json")
RTOL = 1e-9


@pytest.fixture(scope="module")
def fixture():
    with open(FIXTURE) as f:
        return json.load(f)


def fixture_state_dict(shapes: dict, seed: int) -> dict:
    """The fixture's weights, made as its README says: sorted keys, one generator."""
    g = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if key.endswith("num_batches_tracked"):
            state_dict[key] = torch.zeros((), dtype=torch.long)
        elif key.endswith("running_var"):
            state_dict[key] = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
        else:
            state_dict[key] = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
    return state_dict


def fixture_outputs(fixture: dict, step: int, device="cpu") -> tuple:
    """Our float64 model of `step` on the fixture's weights and inputs, computed on `device`, as its
    README says: eval-mode logits, train-mode logits and the parameters' gradients (on the CPU)."""
    model = reactnet_a(binary_weights=step == 2).double()
    model.load_state_dict(fixture_state_dict(fixture[f"step{step}"]["state_dict_shapes"], fixture["seed"]),
                          strict=True)
    model.to(device)
    g2 = torch.Generator().manual_seed(fixture["seed"] + 1)
    x = torch.randn(fixture["input_shape"], generator=g2, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        eval_logits = model(x.to(device))
    model.train()
    xg = torch.randn(fixture["grad_input_shape"], generator=g2, dtype=torch.float64)
    train_logits = model(xg.to(device))
    r = torch.randn(train_logits.shape, generator=g2, dtype=torch.float64)
    (train_logits * r.to(device)).sum().backward()
    grads = {n: p.grad.cpu() for n, p in model.named_parameters()}
    return eval_logits.cpu(), train_logits.detach().cpu(), grads


@pytest.fixture(scope="module", params=[1, 2], ids=["step1", "step2"])
def run(request, fixture):
    """Our model's outputs and gradients on the fixture's weights and inputs, next to the expected ones."""
    step = request.param
    return step, fixture[f"step{step}"], *fixture_outputs(fixture, step)


def assert_rel_close(actual, expected, what):
    expected = torch.tensor(expected, dtype=torch.float64)
    rel = ((actual - expected).abs() / expected.abs()).max().item()
    assert rel < RTOL, f"{what}: max relative error {rel:.2e}"


def test_eval_logits_match_fixture(run):
    step, expected, eval_logits, _, _ = run
    assert_rel_close(eval_logits, expected["eval_logits"], f"step {step} eval logits")


def test_train_logits_match_fixture(run):
    step, expected, _, train_logits, _ = run
    assert_rel_close(train_logits, expected["train_logits"], f"step {step} train logits")


def test_gradients_match_fixture(run):
    step, expected, _, _, grads = run
    assert grads.keys() == expected["grad_sum_norm"].keys()
    for name, grad in grads.items():
        grad_sum, grad_norm = expected["grad_sum_norm"][name]
        # A sum can be near zero by cancellation: measure its error against the norm instead.
        assert abs(grad.sum().item() - grad_sum) <= RTOL * grad_norm, f"step {step} {name} grad sum"
        assert abs(grad.norm().item() - grad_norm) <= RTOL * grad_norm, f"step {step} {name} grad norm"


@pytest.mark.parametrize("step", [1, 2])
def test_state_dict_is_released_layout(fixture, step):
    model = reactnet_a(binary_weights=step == 2)
    shapes = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert shapes == list(fixture[f"step{step}"]["state_dict_shapes"].items())


def test_step1_loads_strictly_into_step2():
    step1, step2 = reactnet_a(binary_weights=False), reactnet_a(binary_weights=True)
    step2.load_state_dict(step1.state_dict(), strict=True)
    for (name, a), b in zip(step1.state_dict().items(), step2.state_dict().values()):
        assert torch.equal(a, b), name


def test_parameter_count():
    assert sum(p.numel() for p in reactnet_a().parameters()) == 29_343_592


def test_num_classes():
    model = reactnet_a(num_classes=10).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_input_sides_multiple_of_32():
    model = reactnet_a().eval()
    with torch.no_grad():
        for size in [(32, 32), (64, 64), (96, 96), (32, 64)]:
            assert model(torch.randn(1, 3, *size)).shape == (1, 1000), size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # float64: the fixture tests
def test_dtypes_forward_backward(dtype):
    torch.manual_seed(0)
    model = reactnet_a().to(dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype, requires_grad=True)
    out = model(x)
    out.float().pow(2).mean().backward()
    assert out.dtype == dtype and torch.isfinite(out).all()
    for name, p in [("input", x), *model.named_parameters()]:
        assert p.grad.dtype == dtype and torch.isfinite(p.grad).all(), name
    assert x.grad.abs().sum() > 0


def test_bfloat16_autocast_forward_backward():
    model = reactnet_a()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    out.float().pow(2).mean().backward()
    assert out.dtype == torch.bfloat16
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_channels_last_matches_contiguous():
    # The stem and the first three blocks: every kind of block (doubling at stride 1, doubling at
    # stride 2, equal widths). float64, so that no sign decision can flip between summation orders.
    torch.manual_seed(0)
    net = torch.nn.Sequential(*reactnet_a().feature[:4]).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def forward_backward(memory_format):
        net.zero_grad(set_to_none=True)
        net.to(memory_format=memory_format)
        xi = x.to(memory_format=memory_format).detach().requires_grad_()
        out = net(xi)
        out.pow(2).sum().backward()
        return [out.detach(), xi.grad] + [p.grad for p in net.parameters()]

    expected = forward_backward(torch.contiguous_format)
    actual = forward_backward(torch.channels_last)
    assert actual[0].is_contiguous(memory_format=torch.channels_last)
    for a, e in zip(actual, expected):
        assert (a - e).abs().max() <= RTOL * e.abs().max()
