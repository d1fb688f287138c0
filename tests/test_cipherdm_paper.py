"""CipherDM's published kernels reproduce their documented behaviour (defects included)."""

import numpy as np

from cipherdm_spu import ops, registry
from cipherdm_spu.protocols.reference import REFERENCES


def test_paper_silu_has_its_documented_jump_at_6():
    silu = registry.kernel("silu", "cipherdm-paper")
    below, above = np.asarray(silu(np.float32(6.0))), np.asarray(silu(np.float32(6.001)))
    assert abs(above - below) > 0.05  # the published pieces do not meet at x = 6
    x = np.linspace(-20, 20, 4001)
    err = np.abs(np.asarray(silu(x)) - REFERENCES["silu"](x)).max()
    assert 0.05 < err < 0.1  # ~0.075 as documented


def test_paper_exp_defects_are_reproduced():
    exp = registry.kernel("exp", "cipherdm-paper")
    assert abs(float(exp(np.float32(0.0))) - 1.0) > 0.04  # ~0.048 at x = 0
    x = np.linspace(-14, -5, 200).astype(np.float32)
    assert np.any(np.asarray(exp(x)) < 0)  # negative values below about -4.6


def test_paper_set_runs_under_the_session(sessions):
    x = np.linspace(-8, 8, 33).astype(np.float32)
    y = sessions["cipherdm-paper"].run(ops.silu, x)
    assert np.abs(y - REFERENCES["silu"](x.astype(np.float64))).max() < 0.1
