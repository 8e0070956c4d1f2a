import pytest
import torch


def pytest_configure(config):
    # Small tensors everywhere: one intra-op thread is as fast and does not stall when another process holds a core.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
