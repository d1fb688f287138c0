import numpy as np
import pytest

from cipherdm_spu import SecureSession
from cipherdm_spu.registry import SHIPPED_SETS as PROTOCOL_SETS


@pytest.fixture(scope="session")
def sessions():
    """One embedded three-party session per protocol set, shared by the tests."""
    made = {name: SecureSession(name) for name in PROTOCOL_SETS}
    yield made
    for s in made.values():
        s.close()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
