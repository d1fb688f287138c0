"""The kernel registry: protocol sets, overrides, outside registration, plaintext behaviour."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cipherdm_spu import ProtocolError, SecureSession, ops, registry

from .conftest import PROTOCOL_SETS


@pytest.mark.parametrize("name", PROTOCOL_SETS)
def test_every_op_has_a_registered_kernel_in_every_set(name):
    pset = registry.protocol_set(name)
    registry.validate(pset)
    for op in registry.OPS:
        assert callable(registry.kernel(op, pset.kernels[op]))


def test_override_by_set_name_and_by_kernel_name():
    pset = registry.resolve("cipherdm", {"softmax": "spu", "silu": "cipherdm-paper"})
    assert pset.kernels["softmax"] == "jax"
    assert pset.kernels["silu"] == "cipherdm-paper"
    assert pset.kernels["gelu"] == "cipherdm"


@pytest.mark.parametrize(
    "protocol, overrides",
    [("no-such-set", None), ("cipherdm", {"nosuchop": "spu"}), ("cipherdm", {"silu": "no-such-kernel"})],
)
def test_unknown_names_are_refused(protocol, overrides):
    with pytest.raises(ProtocolError):
        registry.resolve(protocol, overrides)


def test_protocol_file_with_unknown_runtime_option_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"kernels": {"silu": "jax"}, "runtime": {"not_an_option": 1}}')
    with pytest.raises(ProtocolError):
        registry.register_protocol_set(registry.load_protocol_file(bad))


def test_a_kernel_registered_from_outside_is_used_by_the_session():
    """How to add a kernel: register it, then select it with an override."""

    @registry.register_kernel("silu", "test-relu-only")
    def relu_only(x):
        return jnp.maximum(x, 0.0)

    x = np.linspace(-3, 3, 13).astype(np.float32)
    with SecureSession("cipherdm", overrides={"silu": "test-relu-only"}) as session:
        y = session.run(ops.silu, x)
        assert "pphlo.exponential" not in session.compile(ops.silu, x).mlir
    np.testing.assert_allclose(y, np.maximum(x, 0), atol=1e-4)


def test_ops_run_under_plain_jit_grad_and_vmap_as_jax_nn():
    x = jnp.linspace(-4, 4, 9)
    np.testing.assert_allclose(jax.jit(ops.silu)(x), jax.nn.silu(x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda v: ops.gelu(v).sum())(x), jax.grad(lambda v: jax.nn.gelu(v, approximate=False).sum())(x), rtol=1e-5)
    logits = jnp.arange(24.0).reshape(2, 3, 4) / 7
    np.testing.assert_allclose(jax.vmap(lambda r: ops.softmax(r, axis=0))(logits), jax.nn.softmax(logits, axis=1), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda v: ops.softmax(v, scale=0.25))(logits), jax.nn.softmax(logits * 0.25), rtol=1e-6)
    np.testing.assert_allclose(ops.rsqrt(jnp.array([4.0])), [0.5])


@pytest.mark.parametrize("name", PROTOCOL_SETS)
def test_softmax_with_values_is_the_probabilities_times_them_in_every_set(name):
    """softmax(scale x) @ values as the set's probabilities times them, whether its kernel weighs the values itself
    (ours: divided after the product, which rounds apart in float by their fits' error) or not (the product follows
    its probabilities); under jit, vmap (values batched or shared, or the logits shared by a batch of values) and
    grad."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, (2, 3, 5, 7)).astype(np.float32)
    values = rng.normal(size=(2, 3, 7, 4)).astype(np.float32)
    with registry.use_protocol(name):
        got = jax.jit(lambda a, v: ops.softmax(a, scale=0.5, values=v))(logits, values)
        apart = jax.jit(lambda a: ops.softmax(a, scale=0.5))(logits) @ values
        batched = jax.vmap(lambda a, v: ops.softmax(a, scale=0.5, values=v))(logits, values)
        shared = jax.vmap(lambda a: ops.softmax(a, scale=0.5, values=values[0, 0]))(logits[:, 0])
        shared_apart = jax.vmap(lambda a: ops.softmax(a, scale=0.5))(logits[:, 0]) @ values[0, 0]
        batch_of_values = np.stack([values[0], -values[0], 2 * values[0]], axis=2)  # (3, 7, batch 3, 4)
        one_set_of_rows = jax.vmap(lambda v: ops.softmax(logits[0], scale=0.5, values=v), in_axes=2)(batch_of_values)
        one_at_a_time = [ops.softmax(logits[0], scale=0.5, values=batch_of_values[:, :, i]) for i in range(3)]
    np.testing.assert_allclose(got, apart, atol=2e-3)
    np.testing.assert_allclose(batched, got, atol=1e-6)
    np.testing.assert_allclose(shared, shared_apart, atol=2e-3)
    np.testing.assert_allclose(one_set_of_rows, np.stack(one_at_a_time), atol=1e-6)  # one logits, a batch of values
    if name == "spu":
        np.testing.assert_allclose(got, jax.nn.softmax(logits.astype(np.float64) * 0.5, axis=-1) @ values, atol=1e-5)
    assert jax.grad(lambda a: ops.softmax(a, values=values).sum())(logits).shape == logits.shape


def test_a_softmax_kernel_without_values_gets_the_product_after_it():
    """A kernel written for probabilities alone (no ``values`` parameter) keeps working: the op multiplies after it."""
    calls = []

    @registry.register_kernel("softmax", "test-probabilities-only")
    def probabilities_only(x, axis, exp_impl, scale=1.0, **params):
        calls.append(params)
        return jax.nn.softmax(x * scale, axis=axis)

    logits, values = jnp.arange(12.0).reshape(3, 4) / 5, jnp.arange(8.0).reshape(4, 2)
    with registry.use_protocol("spu", overrides={"softmax": "test-probabilities-only"}):
        got = ops.softmax(logits, values=values)
    np.testing.assert_allclose(got, jax.nn.softmax(logits, axis=-1) @ values, rtol=1e-6)
    assert calls == [{}]


@pytest.mark.parametrize("logits, values, axis, match", [
    ((2, 5, 7), (2, 7, 4), 1, "last axis"),
    ((7,), (7, 4), 0, "rank"),
    ((2, 5, 7), (2, 6, 4), -1, r"\(\.\.\., 7, d\)"),
    ((2, 5, 7), (3, 7, 4), -1, "leading"),
    ((2, 5, 7), (7, 4), -1, "leading"),
])
def test_softmax_refuses_values_it_cannot_weigh(logits, values, axis, match):
    with pytest.raises(ValueError, match=match):
        ops.softmax(jnp.ones(logits), axis=axis, values=jnp.ones(values))


@pytest.mark.parametrize("name", PROTOCOL_SETS)
def test_every_exp_kernel_takes_the_softmax_scale(name):
    """A softmax hands its scale to the set's exp (`ops.softmax`): each exp kernel computes e^(scale x)."""
    exp = registry.kernel("exp", registry.protocol_set(name).kernels["exp"])
    x = jnp.linspace(-12.0, 0.0, 25)
    np.testing.assert_allclose(exp(x, scale=0.25), exp(x * 0.25), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(exp(x, scale=0.25), np.exp(0.25 * np.asarray(x, np.float64)), atol=0.05)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan")])
def test_softmax_refuses_a_scale_that_is_not_a_finite_positive_number(scale):
    with pytest.raises(ValueError, match="scale"):
        ops.softmax(jnp.ones((2, 3)), scale=scale)


def test_rsqrt_with_a_scale_and_a_factor_under_plain_jit_grad_and_vmap():
    """times / sqrt(scale * x), the factor broadcast against x (a norm's (N, 1, G, 1) sums and (G, C/G) weight)."""
    x, times = jnp.array([[[1.0], [4.0]], [[9.0], [0.25]]]), jnp.array([[1.0, -2.0, 3.0], [0.5, 1.0, 2.0]])
    expected = times / jnp.sqrt(1.5 * x)
    np.testing.assert_allclose(jax.jit(lambda a, t: ops.rsqrt(a, t, scale=1.5))(x, times), expected, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(lambda a: ops.rsqrt(a, times, scale=1.5))(x), expected, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(lambda t: ops.rsqrt(x[0], t, scale=1.5))(times[None])[0], expected[0], rtol=1e-6)
    grad = jax.grad(lambda a, t: ops.rsqrt(a, t, scale=1.5).sum(), argnums=(0, 1))(x, times)
    np.testing.assert_allclose(grad[0], (-0.5 * times / jnp.sqrt(1.5) * x**-1.5).sum(-1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(grad[1], (1 / jnp.sqrt(1.5 * x)).sum(0) * jnp.ones_like(times), rtol=1e-5)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale"):
            ops.rsqrt(x, scale=bad)


def test_active_protocol_changes_the_traced_kernel():
    x = jnp.linspace(-3, 3, 7)
    with registry.use_protocol("cipherdm"):
        jaxpr = jax.make_jaxpr(ops.silu)(x)
        approx = ops.silu(x)
    assert "impl=cipherdm" in str(jaxpr)
    assert not np.allclose(approx, jax.nn.silu(x), atol=1e-6)  # the approximation, simulated in float
    np.testing.assert_allclose(approx, jax.nn.silu(x), atol=1e-2)


def test_integer_input_is_refused():
    with pytest.raises(TypeError, match="floating-point"):
        ops.silu(jnp.arange(3))


def test_shipped_sets_are_the_config_files_in_table_order():
    shipped = {p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "protocols").glob("*.json")}
    assert set(registry.SHIPPED_SETS) == shipped
    assert registry.available_protocol_sets()[: len(shipped)] == list(registry.SHIPPED_SETS)


@pytest.mark.parametrize("name", PROTOCOL_SETS)
def test_softmax_takes_the_sets_exp(name):
    """Every setting acts: overriding exp changes softmax (the paper's exp errs ~0.05 near 0, see cipherdm_paper)."""
    logits = jnp.linspace(-3.0, 3.0, 8).reshape(2, 4)
    with registry.use_protocol(name):
        own = ops.softmax(logits)
    with registry.use_protocol(name, overrides={"exp": "cipherdm-paper" if name != "cipherdm-paper" else "spu"}):
        other = ops.softmax(logits)
    assert np.abs(np.asarray(own) - np.asarray(other)).max() > 1e-3


def test_sets_are_looked_up_under_the_install_schemes_data_path(tmp_path, monkeypatch):
    """Where pip puts a wheel's data files: the scheme's data path, which is not sys.prefix for a Debian system
    Python's pip (/usr/local); sys.prefix is looked in after it."""
    import sysconfig

    folder = tmp_path / "share" / "cipherdm-spu" / "protocols"
    folder.mkdir(parents=True)
    (folder / "from-the-data-path.json").write_text(
        '{"kernels": {"silu": "jax", "mish": "jax", "gelu": "jax", "sigmoid": "jax", "softmax": "jax", "exp": "jax", '
        '"rsqrt": "jax"}}')
    monkeypatch.setattr(registry, "_PROTOCOL_SETS", dict(registry._PROTOCOL_SETS))  # forget the set after the test
    real = sysconfig.get_path
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *a, **k: str(tmp_path) if name == "data" else real(name, *a, **k))
    assert registry.protocol_set_dirs()[-2:] == [folder, Path(sys.prefix) / "share" / "cipherdm-spu" / "protocols"]
    assert registry.protocol_set("from-the-data-path").kernels["silu"] == "jax"


def test_a_wheel_install_finds_its_shipped_sets(tmp_path):
    """A wheel's protocol sets are data files (setup.cfg): the wheel, built from this checkout and installed into a
    fresh venv (without its dependencies: this one's are on PYTHONPATH), loads them from its data path, with no
    checkout beside it."""
    import site
    import subprocess

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(root)], check=True, cwd=tmp_path)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    venv_python = tmp_path / "venv" / "bin" / "python"
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv_python), "install", "--no-deps", "-q",
                    str(wheel)], check=True, cwd=tmp_path)
    probe = ("from cipherdm_spu import registry; import sysconfig, sys; "
             "print(registry.protocol_set('cipherdm').kernels['silu']); print(sysconfig.get_path('data')); "
             "print(registry.__file__)")
    out = subprocess.run([str(venv_python), "-P", "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": site.getsitepackages()[0]}).stdout.split()
    assert out[0] == "cipherdm"
    assert Path(out[1]) == tmp_path / "venv"
    assert Path(out[2]).is_relative_to(tmp_path / "venv")  # the wheel's package, not this checkout's
