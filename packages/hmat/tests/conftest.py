import pytest

from structurednets.numerics import torch_threads


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test: the small products here lose more to thread start-up and to
    sharing the cores than they gain, and timings do not depend on the machine's load."""
    with torch_threads(1):
        yield
