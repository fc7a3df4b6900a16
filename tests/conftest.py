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


@pytest.fixture(scope="session", autouse=True)
def subprocess_tmpdir(tmp_path_factory):
    """TMPDIR of the processes the tests start, under pytest's base temp (pruned by pytest): torchrun
    (tools/dist.sh, dist_test.sh) leaves a torchelastic_* folder in the temp dir at every launch, and a test
    run launches it a few dozen times."""
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("subprocess_tmp"))
    yield os.environ["TMPDIR"]
    if old is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old
