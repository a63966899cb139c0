import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """Tiny ops on a loaded 2-core machine: a second torch thread only adds barrier waits (20 ms a matmul)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
