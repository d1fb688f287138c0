import os
import shutil
import tempfile

import numpy as np
import pytest

from cipherdm_spu import SecureSession, compile_cache
from cipherdm_spu.registry import SHIPPED_SETS as PROTOCOL_SETS

_MADE_CACHE = []


def pytest_configure(config):
    """One compile cache for the run, not the user's: made by the first process (xdist's workers, and the cluster
    parties tests start, inherit it), removed by it at the end; a cache the caller named is used as it is."""
    if compile_cache.ENV not in os.environ:
        os.environ[compile_cache.ENV] = tempfile.mkdtemp(prefix="cipherdm-test-compile-cache-")
        _MADE_CACHE.append(os.environ[compile_cache.ENV])


def pytest_unconfigure(config):
    for directory in _MADE_CACHE:
        shutil.rmtree(directory, ignore_errors=True)


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


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A three-process cluster on loopback, started as the README says (certificates, then spu-launch),
    with the tiny UNet of tests/cluster_fixtures.py uploaded by its owner as model "tiny"."""
    from cipherdm_spu import cluster_config
    from cipherdm_spu.client import PartyClients
    from cipherdm_spu.jobs import upload_model
    from cipherdm_spu.plan import Policy

    from .cluster_fixtures import running_cluster, tiny_unet

    directory = tmp_path_factory.mktemp("cluster")
    with running_cluster(directory, session_idle_s=12) as (config, launcher):
        model, params, scheduler = tiny_unet()
        with PartyClients(cluster_config.load(config), "owner") as owner:
            upload_model(owner, "tiny", model, params, scheduler, Policy(users=["user", "user-bob"]))
        yield config, launcher


def fewest_send_actions(session, fn, *args, runs: int = 3) -> int:
    """The fewest send actions of the busiest party over ``runs`` runs of ``fn`` (the count varies by one or two
    from run to run, so comparisons between two programs take each one's fewest)."""
    counts = []
    for _ in range(runs):
        session.run(fn, *args)
        counts.append(session.last_stats.send_actions)
    return min(counts)
