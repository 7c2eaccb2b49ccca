import os

import pytest

# albumentations (pulled in by clip-retrieval) phones home on import unless told not to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch intra-op thread, restoring the previous count afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
