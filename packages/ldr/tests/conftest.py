import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Run the suite on one thread: the LDR kernels are chains of small operations, which
    multi-threaded BLAS makes much slower on a shared, busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
