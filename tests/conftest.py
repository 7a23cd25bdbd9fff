"""Suite-wide settings: one torch thread per test process.

Small nets gain little from a second thread, and with a Celery worker or server subprocess running beside the
tests on a 2-core machine, two threads per process oversubscribe the CPU and slow everything down severalfold.
"""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)
    yield
