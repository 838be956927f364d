import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Fixed seed, one intra-op thread: small ops on a shared 2-core machine are much slower with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
