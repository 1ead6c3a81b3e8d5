"""Shared fixtures: the real data in ../shared/data and the embedded default model."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CLO_SHARED_DATA", REPO.parent / "shared" / "data"))
DEFAULT_THREADS = torch.get_num_threads()  # before any fixture changes it


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (FLORES-200, MAFAND-MT, Alpaca); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set CLO_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model as an HF-format folder, converted once from the PyPI wheel and cached."""
    from clo.errors import CloError
    from clo.model.sources import DEFAULT_MODEL, resolve_model

    try:
        return resolve_model(DEFAULT_MODEL)
    except CloError as e:
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine torch's thread pool
    waits for a descheduled worker on every small op. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def all_threads():
    """The process's own thread count again, for a real model's test in a `one_thread` module: its
    matmuls do gain from the second core (the packed-vs-padded check on the default model: 19 s -> 12 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(DEFAULT_THREADS)
    yield
    torch.set_num_threads(threads)
