"""A fixture for tests of tiny tensors: one torch thread, restored afterwards. On a loaded 2-core machine every op
of a multi-threaded run waits in thread barriers, which makes many-small-op tests (gradcheck, chunked routing)
ten times slower."""

import pytest
import torch


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
