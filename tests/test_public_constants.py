"""Products by public constants SPU would change (`public_constants`): found in pphlo text, refused at compile time,
and the SPU behaviour the check rests on, measured."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cipherdm_spu import ops, public_constants
from cipherdm_spu.errors import ProgramError
from cipherdm_spu.public_constants import imprecise_products

S = "tensor<4x8x!pphlo.secret<f32>>"
P = "tensor<4x8xf32>"
UNIT = 2.0**-18


def program(*body: str) -> str:
    lines = "\n".join("    " + line for line in body)
    return (f"module @jit_f attributes {{pphlo.version = \"0.9.5\"}} {{\n  func.func @main(%arg0: {S}) -> {S} {{\n"
            f"{lines}\n  }}\n}}\n")


def test_a_splat_tiny_constant_multiplied_directly_is_kept():
    """The one form SPU multiplies at extra precision."""
    text = program(f"%0 = pphlo.constant dense<9.53674316E-7> : {P}",
                   f"%1 = pphlo.multiply %arg0, %0 : ({S}, {P}) -> {S}", f"return %1 : {S}")
    assert imprecise_products(text, 18) == []


@pytest.mark.parametrize("constant", [
    "dense<[[3.0E-6, 1.0], [1.0, 1.0]]>",  # a non-splat array
    'dense<"0x000000006AA446350000803F0000803F">',  # MLIR's raw little-endian form: 0, 7.4e-7, 1, 1
])
def test_a_non_splat_array_with_a_tiny_element_is_reported(constant):
    text = program(f"%0 = pphlo.constant {constant} : tensor<2x2xf32>",
                   "%1 = pphlo.reshape %arg0 : (tensor<4x8x!pphlo.secret<f32>>) -> tensor<2x16x!pphlo.secret<f32>>",
                   "%2 = pphlo.dot %0, %1 : (tensor<2x2xf32>, tensor<2x16x!pphlo.secret<f32>>) -> tensor<2x16x!pphlo.secret<f32>>",
                   f"return %2 : {S}")
    found = imprecise_products(text, 18)
    assert len(found) == 1 and "pphlo.dot" in found[0] and "line" in found[0]


def test_a_tiny_constant_reached_through_a_broadcast_is_reported():
    text = program("%0 = pphlo.constant dense<9.53674316E-7> : tensor<8xf32>",
                   f"%1 = pphlo.broadcast %0, dims = [1] : (tensor<8xf32>) -> {P}",
                   f"%2 = pphlo.multiply %arg0, %1 : ({S}, {P}) -> {S}", f"return %2 : {S}")
    assert len(imprecise_products(text, 18)) == 1


@pytest.mark.parametrize("value", [2.0**-17, 3 * UNIT, 4 * UNIT, 4.5 * UNIT, 0.3, 0.0])
def test_constants_on_the_grid_or_of_four_units_and_more_are_not_reported(value):
    """2**-17 is exactly 2 units; from 4 units on every form gets SPU's usual rounding (tests below)."""
    text = program(f"%0 = pphlo.constant dense<{value!r}> : tensor<8xf32>",
                   f"%1 = pphlo.broadcast %0, dims = [1] : (tensor<8xf32>) -> {P}",
                   f"%2 = pphlo.multiply %arg0, %1 : ({S}, {P}) -> {S}", f"return %2 : {S}")
    assert imprecise_products(text, 18) == []


@pytest.mark.parametrize("printed, reported", [
    ("3.81469727E-6", False), ("7.62939453E-6", False), ("1.14440918E-5", False),  # 1, 2, 3 units as MLIR prints them
    ("9.53674316E-7", True), ("5.72204590E-6", True),  # 0.25 and 1.5 units
])
def test_constants_are_read_as_their_element_type_holds_them(printed, reported):
    """MLIR prints an f32 with the fewest digits that read back as it: 2**-17 is 7.62939453E-6, a hair under two units
    as a float64, exactly two as an f32."""
    text = program(f"%0 = pphlo.constant dense<[{printed}, 1.0]> : tensor<2xf32>",
                   "%1 = pphlo.reshape %arg0 : (tensor<4x8x!pphlo.secret<f32>>) -> tensor<16x2x!pphlo.secret<f32>>",
                   "%2 = pphlo.multiply %1, %0 : (tensor<16x2x!pphlo.secret<f32>>, tensor<2xf32>) -> "
                   "tensor<16x2x!pphlo.secret<f32>>", f"return %2 : {S}")
    assert bool(imprecise_products(text, 18)) == reported


LOOP = [
    "%0 = pphlo.constant dense<1> : tensor<i32>",
    f"%1 = pphlo.constant dense<9.53674316E-7> : {P}",
    "%2 = pphlo.constant dense<2> : tensor<i32>",
    "%4 = pphlo.constant dense<0> : tensor<i32>",
    f"%7:2 = pphlo.while(%arg1 = %4, %arg2 = %arg0) : tensor<i32>, {S}",
    " cond {",
    "  %9 = pphlo.less %arg1, %2 : (tensor<i32>, tensor<i32>) -> tensor<i1>",
    "  pphlo.return %9 : tensor<i1>",
    "} do {",
    "  %9 = pphlo.add %arg1, %0 : tensor<i32>",
    f"  %11 = pphlo.broadcast_as %1, %arg0 : ({P}, {S}) -> {P}",
    f"  %12 = pphlo.multiply %arg2, %11 : ({S}, {P}) -> {S}",
    f"  pphlo.return %9, %12 : tensor<i32>, {S}",
    "}",
    f"return %7#1 : {S}",
]


def test_a_tiny_constant_hoisted_out_of_a_loop_is_reported():
    """SPU's compiler hoists the body's constant and hands it in through broadcast_as: printed as SPU 0.9.5 does."""
    found = imprecise_products(program(*LOOP), 18)
    assert len(found) == 1 and "line 14: pphlo.multiply by the constant of line 4" in found[0]


def test_a_tiny_constant_carried_into_a_loop_is_reported():
    body = [line.replace("%arg2 = %arg0", "%arg2 = %arg0, %arg3 = %1").replace("%12 = pphlo.multiply %arg2, %11",
                                                                            "%12 = pphlo.multiply %arg2, %arg3")
            for line in LOOP]
    assert len(imprecise_products(program(*body), 18)) == 1


def test_a_splat_constant_of_the_enclosing_region_used_directly_in_a_loop_body_is_reported():
    """Not measured under SPU (its compiler hands hoisted constants in through broadcast_as): taken as handed in."""
    body = [line.replace("%11 = pphlo.broadcast_as %1, %arg0", "%11 = pphlo.add %arg1, %0")
            .replace("%12 = pphlo.multiply %arg2, %11", "%12 = pphlo.multiply %arg2, %1") for line in LOOP]
    assert len(imprecise_products(program(*body), 18)) == 1


def test_names_are_resolved_in_their_own_region():
    """Sibling regions reuse value names: a tiny constant %9 of the loop's test is not the body's %9."""
    body = [line.replace("%9 = pphlo.less %arg1, %2 : (tensor<i32>, tensor<i32>) -> tensor<i1>",
                         f"%9 = pphlo.constant dense<9.53674316E-7> : {P}")
            .replace("%11 = pphlo.broadcast_as %1, %arg0", "%11 = pphlo.broadcast_as %9, %arg0")
            for line in LOOP]
    assert imprecise_products(program(*body), 18) == []


# ---- under SPU: what the check rests on, and the programs it refuses


def _twice_in_a_loop(f):
    """f(v) computed twice in a loop's body and averaged: a loop SPU cannot unroll away."""
    return lambda v: jax.lax.fori_loop(0, 2, lambda i, acc: acc + f(v), jnp.zeros_like(f(v))) * 0.5


def test_spu_keeps_a_tiny_splat_product_and_the_check_lets_it_through(sessions):
    x = np.linspace(-1e4, 1e4, 256, dtype=np.float32).reshape(4, 64)
    c = 0.7 * UNIT  # encoded on the grid it would be 0
    y = sessions["spu"].run(lambda v: v * c, x)
    assert np.abs(y - x.astype(np.float64) * c).max() <= 1e-3 * np.abs(x).max() * c


@pytest.mark.parametrize("units", [0.7, 1.5, 3.9])
def test_spu_multiplies_a_non_splat_tiny_array_by_its_truncated_encoding(sessions, units, monkeypatch):
    """What a refused product would compute: trunc(c * 2**18) units (0, 1 or 3 here), silently. Run with the check
    switched off (SPU's own compiler), to show the check guards against a real error."""
    x = np.full((4, 64), 1e4, np.float32)
    cs = (units * UNIT * np.linspace(1, 1.01, 256)).reshape(4, 64).astype(np.float32)
    with monkeypatch.context() as patch:
        patch.setattr(public_constants, "check", lambda *args: None)
        y = sessions["spu"].run(lambda v: v * jnp.asarray(cs), x)
    np.testing.assert_allclose(y, x * np.trunc(cs / UNIT) * UNIT, rtol=0, atol=1e-3)
    with pytest.raises(ProgramError, match="non-splat"):
        sessions["spu"].run(lambda v: v * jnp.asarray(cs), x)


def test_the_masked_square_silu_in_a_loop_is_refused_and_straight_is_right(sessions):
    """The sampler as one fori_loop came out wrong for this reason: the SiLU's 2**-28 truncation, hoisted out of the
    loop's body, became 0. Refused, with the reason; the same SiLU outside a loop keeps its accuracy."""
    x = np.linspace(-8, 8, 256, dtype=np.float32).reshape(4, 64)
    with pytest.raises(ProgramError, match="loop"):
        sessions["cipherdm"].run(_twice_in_a_loop(ops.silu), x)
    y = sessions["cipherdm"].run(ops.silu, x)
    assert np.abs(y - x / (1 + np.exp(-x.astype(np.float64)))).max() <= 1e-2


def test_loops_of_kernels_without_tiny_constants_still_compile(sessions):
    """rsqrt and softmax hold only on-grid or large constants: a loop of them runs, and right."""
    x = np.random.default_rng(0).normal(0, 2, (4, 64)).astype(np.float32)
    f = lambda v: ops.softmax(v) + ops.rsqrt(jnp.sum(v * v, -1, keepdims=True) * 0.01 + 0.5)  # noqa: E731
    looped = sessions["cipherdm"].run(_twice_in_a_loop(f), x)
    straight = sessions["cipherdm"].run(f, x)
    assert np.abs(looped - straight).max() <= 1e-4
