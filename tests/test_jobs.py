"""The cluster's step programs and catalog: the owner's input bound, applied to every secret input inside the
program; a manifest's tensors, counted before they are listed; a job's public scales, judged by the policy; a
user's checks of the parties' reports before it shares anything."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cipherdm_spu import jobs
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


def test_values_at_the_rings_edge_are_clamped_to_their_own_side(sessions):
    """Made inside the program (x + x + y: float32 cannot share them), these lie within the bound of the ring's edge
    (2^45 at 18 fraction bits), where a comparison's difference wraps: each still clamps to the bound on its own
    side (an independent review got -v back from a clamp that did not gate on the sign)."""
    x = np.array([-(2.0**44 - 2.0**20), 2.0**44 - 2.0**20, -2.0**43, 2.0**43, 3.0], np.float32)
    y = np.array([-(2.0**21 - 64), 2.0**21 - 64, 0.0, 0.0, 0.0], np.float32)  # v = +-(2^45 - 64), +-2^44, 6
    step = clamped_inputs(_echo, 256.0)
    got, _, _ = sessions["cipherdm"].run(lambda x, y: step(None, x + x + y, None, None, None, None), x, y)
    np.testing.assert_array_equal(got, [-256.0, 256.0, -256.0, 256.0, 6.0])


def test_the_policy_bound_is_validated_and_reaches_the_step_program(monkeypatch):
    assert Policy.from_dict(None).input_bound == 256.0 and Policy.from_dict({"input_bound": 8}).input_bound == 8.0
    for bad in (0, 1e-300, -1, float("inf"), float("nan"), 10**400, MAX_INPUT_BOUND * 2, True, "8"):
        with pytest.raises(ValueError, match="policy.input_bound must be a number"):
            Policy.from_dict({"input_bound": bad})
    seen = []

    class Stop(Exception):
        pass

    def wrap(step_fn, bound):  # records the bound the step program was built with, and stops before compiling
        seen.append(bound)
        raise Stop

    monkeypatch.setattr(jobs, "clamped_inputs", wrap)
    model, params, scheduler = tiny_unet()
    for policy, bound in ((Policy(input_bound=8.0), 8.0), (None, 256.0)):
        manifest = json.loads(build_manifest(model, scheduler, policy or Policy()))
        if policy is None:
            del manifest["policy"]  # a manifest without a policy: the defaults
        with pytest.raises(Stop):
            _program(json.dumps(manifest, sort_keys=True), json.dumps(TINY_JOB, sort_keys=True), 18)
        assert seen[-1] == bound


def test_a_manifest_of_too_many_tensors_is_refused_before_they_are_listed():
    """A 1 KB manifest can name millions of time terms (timesteps x the terms of each): an independent review made a
    party build such a list (gigabytes) before counting it. The catalog counts first."""
    model, _, scheduler = tiny_unet()
    manifest = build_manifest(model, {**scheduler, "num_train_timesteps": 10000}, Policy())
    catalog = jobs.SamplingCatalog()
    listed = catalog.model_tensors(build_manifest(model, scheduler, Policy()), 10**6)
    per_timestep = sum(name.startswith("t/0/") for name in listed)
    weights = sum(name.startswith("w/") for name in listed)
    assert per_timestep > 0 and len(listed) == weights + 1000 * per_timestep  # the shipped config: 1000 timesteps
    with pytest.raises(ValueError, match=f"the model has {weights + 10000 * per_timestep} tensors, more than 5000"):
        catalog.model_tensors(manifest, 5000)


def test_a_jobs_public_scales_reach_the_policy():
    """The job's guidance and ControlNet scales go to the owner's policy with the job's terms (`Policy.refusal`), on a
    text-conditional UNet with a ControlNet (configs of tests/test_sd_cli.py's tiny SD and test_sd_images' ControlNet)."""
    from cipherdm_spu.models import ControlledUNet

    unet = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    controlnet = dict(in_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
                      attention_head_dim=4, norm_num_groups=8, conditioning_embedding_out_channels=(8, 16))
    model = ControlledUNet.from_config({"unet": unet, "controlnet": controlnet})
    _, _, scheduler = tiny_unet()
    manifest = build_manifest(model, scheduler, Policy())
    catalog = jobs.SamplingCatalog()
    job = {"sampler": "ddim", "steps": 2, "batch": 1, "tokens": 16}
    assert Policy().refusal("user", catalog.terms(manifest, json.dumps({**job, "guidance_scale": 7.5}))) is None
    for scales, message in (({"guidance_scale": 50}, "guidance_scale 50 is above the policy's max_guidance_scale 20"),
                            ({"controlnet_scale": -3}, "controlnet_scale -3 is beyond the policy's max_controlnet_scale 2")):
        terms = catalog.terms(manifest, json.dumps({**job, **scales}))
        assert (terms.guidance_scale, terms.controlnet_scale) == (scales.get("guidance_scale", 1.0),
                                                                  scales.get("controlnet_scale", 1.0))
        assert Policy().refusal("user", terms).startswith(message)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0, got 1000"):  # not OverflowError
        catalog.terms(manifest, json.dumps({**job, "guidance_scale": 10**400}))
    model, _, _ = tiny_unet()  # a class-conditional model: no guidance, no ControlNet, whatever the policy's bounds
    terms = catalog.terms(build_manifest(model, scheduler, Policy()), json.dumps(TINY_JOB))
    assert (terms.guidance_scale, terms.controlnet_scale) == (1.0, None)
    assert Policy(max_guidance_scale=1.0, max_controlnet_scale=0.0).refusal("user", terms) is None


class _Parties:
    """Three parties' answers to a user's session_open, as `PartyClients` would return them; records every call."""

    role, identity = "user", "user"

    def __init__(self, opened):
        self.opened, self.calls, self.requests = opened, [], []

    def check_ready(self):
        pass

    def until_done(self, method, request, what):
        self.calls.append(method)
        self.requests.append(request)
        return self.opened if method == "session_open" else None

    def close_session(self, session_id):
        self.calls += ["session_close"] * 3
        return self.unclosed

    unclosed = []  # why parties did not confirm a close (PartyClients.close_session)


@pytest.mark.parametrize("change, message", [
    ({"executable_sha256": "f" * 64}, "the parties compiled different executables for the same job; refusing to run"),
    ({"model_owner": "owner-evil"}, "the parties hold model 'm' from different owners \\(owner, owner-evil\\)"),
])
def test_a_user_refuses_parties_that_disagree_before_sending_anything(change, message):
    """The user checks the three parties' reports of a session before it starts: one executable (each party compiled
    the job itself) and one owner of the model. Either mismatch ends the session with nothing shared."""
    from cipherdm_spu.errors import ClusterError

    one = {"executable_sha256": "e" * 64, "model_owner": "owner", "slots": {"x": [[1, 1, 8, 8], "float32"]}}
    parties = _Parties([one, one, {**one, **change}])
    with pytest.raises(ClusterError, match=message):
        jobs.sample_on_cluster(parties, "m", TINY_JOB, np.zeros((1, 1, 8, 8), np.float32), owner="owner")
    assert parties.calls == ["session_open"] + ["session_close"] * 3  # never started, nothing put


def test_a_user_is_warned_of_a_party_that_did_not_confirm_the_close():
    """A party that never confirmed the close keeps the user's shares until its session_idle_s: the user is told."""
    from cipherdm_spu.errors import ClusterError

    one = {"executable_sha256": "e" * 64, "model_owner": "owner", "slots": {"x": [[1, 1, 8, 8], "float32"]}}
    parties = _Parties([one, one, {**one, "executable_sha256": "f" * 64}])
    parties.unclosed = ["party P2 at 127.0.0.1:1 is unreachable (session_close): connection refused"]
    with pytest.warns(UserWarning, match="was not closed there: party P2 .* after its session_idle_s"):
        with pytest.raises(ClusterError, match="different executables"):
            jobs.sample_on_cluster(parties, "m", TINY_JOB, np.zeros((1, 1, 8, 8), np.float32), owner="owner")


def test_a_user_names_the_owner_and_refuses_a_model_of_another():
    """The user's session_open names the owner whose model it means (the parties look the id up in that owner's
    namespace); should all three report another owner, the user still refuses before sending anything."""
    from cipherdm_spu.errors import ClusterError

    evil = {"executable_sha256": "e" * 64, "model_owner": "owner-evil", "slots": {"x": [[1, 1, 8, 8], "float32"]}}
    parties = _Parties([evil] * 3)
    with pytest.raises(ClusterError, match="model 'm' was uploaded by 'owner-evil', not 'owner'; refusing to send it"):
        jobs.sample_on_cluster(parties, "m", TINY_JOB, np.zeros((1, 1, 8, 8), np.float32), owner="owner")
    assert parties.calls == ["session_open"] + ["session_close"] * 3
    (opened,) = parties.requests
    assert (opened.model_id, opened.model_owner) == ("m", "owner")


def test_a_clients_shares_keep_spus_log_off_the_terminal(tmp_path):
    """The owner's upload and the user's inputs cut shares with SPU's Io (`jobs._share_io`); SPU's first log lines
    (its thread pool) go to the SPU log file, not to the client's terminal. In a fresh process, since SPU's logger is
    the process's."""
    code = """
import types, numpy as np, spu.libspu as libspu
from cipherdm_spu import jobs, spu_config
cluster = types.SimpleNamespace(runtime_config=lambda: spu_config.runtime_config({}))
io = jobs._share_io(types.SimpleNamespace(cluster=cluster))
io.make_shares(np.zeros(1 << 20, np.float32), libspu.Visibility.VIS_SECRET)  # large: SPU starts a thread pool
print("shared")
"""
    env = {**os.environ, "CIPHERDM_SPU_LOG": str(tmp_path / "spu.log")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "shared"
    assert "thread_pool" not in done.stdout + done.stderr
    assert "thread_pool" in (tmp_path / "spu.log").read_text()  # the line it logged, in its file
