"""Fixtures shared by several test modules."""
import os

import pytest
import torch

# No test needs the W&B service: runs that log do so to offline files (also in the processes tests start)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# pytest-xdist runs a worker per core: a second intra-op thread per worker (or per process a test starts) only
# oversubscribes the cores, and OpenMP threads spinning for a busy core slowed single tests 30-fold
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on 8x8 images gain nothing from a second intra-op thread, which on a busy machine only adds
    OpenMP synchronisation; modules of such tests opt in with ``pytestmark = usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(items):
    """The long tests first: started last, one of them would run alone on the last busy core."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
