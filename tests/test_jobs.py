"""The cluster's step programs: the owner's input bound, applied to every secret input inside the program."""

import json

import numpy as np
import pytest

from cipherdm_spu.jobs import _program, build_manifest, clamped_inputs
from cipherdm_spu.plan import MAX_INPUT_BOUND, Policy

from .cluster_fixtures import TINY_JOB, tiny_unet


def _echo(weights, x, condition, terms, coefficients, noise):
    """A stand-in step that returns what it was given, to see the clamp."""
    return x, condition, noise


def test_every_secret_input_is_clamped_to_the_bound_under_spu(sessions):
    """Inside the bound a value passes unchanged (its own bits); beyond it, as far as the fixed point reaches,
    it becomes the bound exactly: the user's x, each condition and the noise."""
    x = np.array([-2.0**40, -1e4, -256.5, -256.0, -3.25, 0.0, 1e-5, 255.75, 256.0, 300.0, 2.0**40], np.float32)
    condition = (x[::-1].copy(), x * 0.5)
    step = clamped_inputs(_echo, 256.0)
    got_x, got_condition, got_noise = sessions["cipherdm"].run(
        lambda x, c0, c1, n: step(None, x, (c0, c1), None, None, n), x, *condition, -x)
    encoded = lambda v: np.trunc(np.asarray(v, np.float64) * 2**18) / 2**18  # noqa: E731 - SPU's fixed point
    expect = lambda v: np.clip(encoded(v), -256.0, 256.0)  # noqa: E731
    np.testing.assert_array_equal(got_x, expect(x))
    np.testing.assert_array_equal(got_condition[0], expect(condition[0]))
    np.testing.assert_array_equal(got_condition[1], expect(condition[1]))
    np.testing.assert_array_equal(got_noise, expect(-x))
    assert clamped_inputs(_echo, 1.0)(None, x, None, None, None, None)[2] is None  # no noise slot: none made


def test_the_policy_bound_is_validated_and_reaches_the_compiled_step():
    assert Policy.from_dict(None).input_bound == 256.0 and Policy.from_dict({"input_bound": 8}).input_bound == 8.0
    for bad in (0, -1, float("inf"), MAX_INPUT_BOUND * 2, True, "8"):
        with pytest.raises(ValueError, match="policy.input_bound must be a number"):
            Policy.from_dict({"input_bound": bad})
    model, params, scheduler = tiny_unet()
    code = _program(build_manifest(model, scheduler, Policy(input_bound=8.0)), json.dumps(TINY_JOB, sort_keys=True),
                    18).code.decode()
    # the owner's bound is a public constant of the step (the default's is not there)
    assert "dense<-8.000000e+00>" in code and "dense<8.000000e+00>" in code and "2.560000e+02>" not in code
