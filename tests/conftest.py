"""The tests' pytest configuration: the `cuda` marker of the GPU tier (tests/test_cuda.py)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU, skipped without one; the tier runs with "
                            "`python -m pytest -q -m cuda tests` (tests/test_cuda.py)")
