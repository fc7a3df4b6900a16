import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


@pytest.fixture(scope="session")
def repo_root():
    return ROOT


@pytest.fixture(scope="session")
def shared_data():
    """The shared real media (../shared/data); tests using it skip when it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return os.path.abspath(SHARED_DATA)
