"""The IR audit: real compiled executables pass; reveals are found however they are written; whatever
the parser does not understand is refused (fail closed)."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from cipherdm_spu import Public, SecureSession, ops
from cipherdm_spu.ir_audit import IrAuditError, audit, declassifications
from cipherdm_spu.models import sample_shape
from cipherdm_spu.registry import available_protocol_sets
from cipherdm_spu.sampling import SecureDiffusion, one_hot
from tests.test_sampling import prepare_for, tiny_model  # noqa: F401 - the fixture

S4 = "tensor<4x!pphlo.secret<f32>>"
SECRET_TO_PUBLIC = f"%1 = pphlo.convert %0 : ({S4}) -> tensor<4xf32>"
PUBLIC_TO_SECRET = "%2 = pphlo.convert %arg1 : (tensor<f32>) -> tensor<!pphlo.secret<f32>>"


def module(body: str, outs: str = S4, ret: str = f"%0 : {S4}") -> str:
    """A hand-written executable: @main(secret %arg0, public %arg1), %0 = %arg0 + %arg0, then ``body``."""
    return (f"module @m {{\n  func.func @main(%arg0: {S4}, %arg1: tensor<f32>) -> {outs} {{\n"
            f"    %0 = pphlo.add %arg0, %arg0 : {S4}\n{body}\n    return {ret}\n  }}\n}}\n")


def session_for(sessions, name):
    return sessions[name] if name in sessions else SecureSession(name)


@pytest.fixture(scope="module")
def small_ir(sessions):
    """silu, softmax, max and a matmul on secrets, with a public scale, compiled for the cipherdm set."""
    return compile_small(sessions["cipherdm"])


def compile_small(session):
    fn = lambda x, w, c: ops.softmax(ops.silu(x @ w) * c) + jnp.max(x, axis=-1, keepdims=True)  # noqa: E731
    return session.compile(fn, np.ones((2, 4), np.float32), np.ones((4, 4), np.float32),
                           Public(np.ones(4, np.float32))).mlir


def insert_in_main(ir: str, lines: str) -> str:
    at = ir.rindex("\n    return ")
    return ir[:at] + "\n" + lines + ir[at:]


# -- hand-written IR ------------------------------------------------------------------------------

def test_secret_to_public_conversion_is_found():
    found = declassifications(module(SECRET_TO_PUBLIC))
    assert len(found) == 1 and SECRET_TO_PUBLIC in found[0] and "public result" in found[0]
    assert declassifications(module(PUBLIC_TO_SECRET)) == []


def test_public_outputs_of_main_are_found():
    ir = module("", outs=f"({S4}, tensor<f32>)", ret=f"%0, %arg1 : {S4}, tensor<f32>")
    assert declassifications(ir) == ["line 2: public output #1 of @main"]
    with pytest.raises(IrAuditError, match="public output #1"):
        audit(ir)
    audit(ir, allowed_public_outputs=1)  # the trailing one may be public when the caller says so


def test_audit_refuses_what_it_finds_and_is_a_value_error():
    with pytest.raises(ValueError, match="secret operand, public result"):
        audit(module(SECRET_TO_PUBLIC))
    audit(module(PUBLIC_TO_SECRET))


def test_functions_and_calls():
    helper = (f"  func.func private @leak(%a: {S4}) -> tensor<4xf32> {{\n"
              f"    %p = pphlo.convert %a : ({S4}) -> tensor<4xf32>\n    return %p : tensor<4xf32>\n  }}\n")
    call = f"    %c = func.call @leak(%0) : ({S4}) -> tensor<4xf32>"
    ir = module(call).replace("module @m {\n", "module @m {\n" + helper)
    found = declassifications(ir)
    assert any("@leak returns public value #0 derived from secrets" in f for f in found)
    assert any("func.call @leak" in f and "public result" in f for f in found)
    assert sum("pphlo.convert %a" in f for f in found) == 1
    with pytest.raises(IrAuditError, match="undefined function @nowhere"):
        declassifications(module(call.replace("@leak", "@nowhere")))


@pytest.mark.parametrize("body", [
    f"%1 = pphlo.reveal %0 : {S4}",
    f'%1 = "pphlo.custom_call"(%0) {{call_target_name = "spu.declassify"}} : ({S4}) -> {S4}',
    f"pphlo.dbg_print %0 : {S4}",
    f'%1 = "pphlo.r\\65veal"(%0) : ({S4}) -> {S4}',  # escaped in a generic op name
    f'%1 = pphlo.custom_call @"spu.r\\65veal"(%0) : ({S4}) -> {S4}',
])
def test_ops_named_as_reveals_are_found(body):
    assert len(declassifications(module(body))) == 1


@pytest.mark.parametrize("body, message", [
    ("%1 = pphlo.negate %9 : tensor<4xf32>", "undefined value %9"),
    ("%1 = pphlo.negate %0 : tensor<4xf32>", "operand types do not match"),  # a type that lies
    ("%1 = pphlo.negate %0 : tensor<4x!pphlo.mystery<f32>>", "cannot classify type"),
    ("%1 = pphlo.negate %0 : memref<4xf32>", "cannot classify type"),
    (f"%1 = pphlo.negate %0\n    %2 = pphlo.negate %0 : {S4}", "defined inside pphlo.negate"),
    ("%1 = pphlo.negate %0", "does not end in a return"),  # it swallowed the return: no ':' type
    (f"%0 = pphlo.negate %0 : {S4}", "repeated SSA definition"),
    (f"%1 = pphlo.pad %0, %arg1, low = [1 : ({S4}, tensor<f32>) -> {S4}", "unbalanced"),
    (f"%1 = arith.negf %0 : {S4}", "expected a pphlo or func operation"),
    (f"%1 = pphlo.negate %0 : {S4} /* comment */", "unexpected character"),
    (f"%1 = pphlo.constant dense<[1.0, 2.0> : tensor<2xf32>", "unbalanced '<'"),
])
def test_what_it_cannot_understand_is_refused(body, message):
    with pytest.raises(IrAuditError, match=message):
        declassifications(module(body))


def test_unbalanced_module_and_missing_main_are_refused():
    with pytest.raises(IrAuditError, match="unexpected end"):
        declassifications(module("").rstrip()[:-1])
    with pytest.raises(IrAuditError, match="no @main"):
        declassifications(module("").replace("@main", "@other"))
    with pytest.raises(IrAuditError, match="nested too deeply"):
        declassifications(module('%1 = "pphlo.wrap"() ({' * 5000))
    with pytest.raises(IrAuditError, match="MLIR text"):
        declassifications(b"module {}")


# -- real compiled IR -----------------------------------------------------------------------------

def test_compiled_secret_computation_reveals_nothing(sessions):
    compiled = sessions["cipherdm"].compile(lambda x, c: ops.softmax(x * c) + ops.silu(x),
                                            np.ones((2, 3), np.float32), Public(np.ones(3, np.float32)))
    assert "pphlo" in compiled.mlir
    assert declassifications(compiled.mlir) == []


@pytest.mark.parametrize("protocol", available_protocol_sets())
def test_real_executables_audit_clean(sessions, tiny_model, protocol):  # noqa: F811
    """silu/softmax/max/matmul and a sampling step, as compiled for each protocol set: the step run_ddim.py runs in
    test_sampling's end-to-end test (DDIM, eta 0.5, two labels, the tiny model), which then finds it compiled."""
    session = session_for(sessions, protocol)
    model, params, sampler, labels, batch, _, _ = prepare_for(tiny_model, "--scheduler", "ddim", "--steps", "2",
                                                              "--labels", "1,4", "--eta", "0.5", "--protocol", protocol)
    diffusion = SecureDiffusion(session, model, params, sampler)
    try:
        x = np.zeros((batch, *sample_shape(model.config)), np.float32)
        args = (diffusion._weights, x, one_hot(labels, model.config.num_class_embeds),
                diffusion.time_terms(sampler.timesteps[0]), Public(sampler.coefficient_table()[0]), x)
        step = session.compile(diffusion._step, *args).mlir
        small = compile_small(session)
    finally:
        diffusion.close()
        if protocol not in sessions:
            session.close()
    assert "pphlo.convolution" in step
    assert "reducer(" in small  # jnp.max: a region the audit walks (our softmax's max is a tournament, no reducer)
    audit(small)
    audit(step)  # ~0.6 MB of IR: one linear pass over the tokens, well under a second
    assert declassifications(step) == []


# -- adversarial edits of real IR -----------------------------------------------------------------

SECRET_ARG = "tensor<2x4x!pphlo.secret<f32>>"
CONVERT = f"%900 = pphlo.convert %arg0 : ({SECRET_ARG}) -> tensor<2x4xf32>"
SPLIT = (f'%900:2 = "pphlo.custom_call"(%arg0) {{call_target_name = "split"}} '
         f": ({SECRET_ARG}) -> ({SECRET_ARG}, tensor<f32>)")  # a multi-result op: one result public


def test_main_signature_split_over_lines_with_comments(small_ir):
    head = re.search(r"func\.func @main\((.*?)\) -> (.*?) \{\n", small_ir)
    args = ",\n      // an argument\n      ".join(head[1].split(", "))
    split = small_ir.replace(head[0], f"func.func   @main(\n      {args}\n    )\n    ->\n  {head[2]}  {{  // body\n")
    assert split.count("\n") > small_ir.count("\n") + 5
    audit(split)  # understood: nothing found
    public = split.replace(f"->\n  {head[2]}", "->\n  tensor<2x4xf32>")
    public = re.sub(r"\n    return %\d+ : .*", "\n    return %900 : tensor<2x4xf32>", public)
    public = insert_in_main(public, "    " + CONVERT)
    found = declassifications(public)
    assert any("public output #0" in f for f in found) and any("pphlo.convert %arg0" in f for f in found)


@pytest.mark.parametrize("op", [
    CONVERT,
    f'%900 = "pphlo.convert"(%arg0) : ({SECRET_ARG}) -> tensor<2x4xf32>',
    f'%900 = "pphlo.convert"(%arg0)\n  {{note = "x"}}\n  : ({SECRET_ARG})\n  -> tensor<2x4xf32>  // generic, split',
    SPLIT,
])
def test_inserted_secret_to_public_op_is_found(small_ir, op):
    found = declassifications(insert_in_main(small_ir, "    " + op))
    assert len(found) == 1 and "secret operand, public result" in found[0]


def test_multi_result_uses(small_ir):
    uses = f"    {SPLIT}\n    %901 = pphlo.negate %900#1 : tensor<f32>\n    %902 = pphlo.negate %900#0 : {SECRET_ARG}"
    assert len(declassifications(insert_in_main(small_ir, uses))) == 1  # only the custom_call itself
    with pytest.raises(IrAuditError, match="operand types do not match"):  # %900#1 is public, not secret
        declassifications(insert_in_main(small_ir, uses.replace("%900#0", "%900#1")))
    with pytest.raises(IrAuditError, match="no such result"):
        declassifications(insert_in_main(small_ir, uses.replace("%900#1", "%900#2")))


@pytest.mark.parametrize("op", [
    "%901 = pphlo.convert {arg} : (tensor<!pphlo.secret<f32>>) -> tensor<f32>",
    "%901 = pphlo.reveal {arg} : tensor<!pphlo.secret<f32>>",
])
def test_reveal_inside_a_reduce_region_is_found(small_ir, op):
    header = re.search(r"reducer\((%\w+): [^\n]*\{\n", small_ir)
    edited = small_ir.replace(header[0], header[0] + "      " + op.format(arg=header[1]) + "\n", 1)
    assert len(declassifications(edited)) == 1


def test_public_region_argument_of_secret_reduce_is_found(small_ir):
    reduce = ('%1 = "pphlo.reduce"(%0, %arg1) ({\n    ^bb0(%a: tensor<f32>, %b: tensor<f32>):\n'
              '      %s = pphlo.add %a, %b : tensor<f32>\n      "pphlo.return"(%s) : (tensor<f32>) -> ()\n'
              f'    }}) {{dimensions = array<i64: 0>}} : ({S4}, tensor<f32>) -> tensor<!pphlo.secret<f32>>')
    found = declassifications(module(reduce))  # generic form, with a ^bb0 block
    assert len(found) == 1 and "public region argument" in found[0]
    header = re.search(r"reducer\((%\w+): tensor<!pphlo.secret<f32>>", small_ir)
    edited = small_ir.replace(header[0], f"reducer({header[1]}: tensor<f32>", 1)
    with pytest.raises(IrAuditError, match="operand types do not match"):  # its uses in the region now lie
        declassifications(edited)


P4 = "tensor<4xf32>"
LOOP_YIELDING = (  # a while over a public value whose body hands the secret %0 out as its (public) result
    f'%w = "pphlo.while"(%arg2) ({{\n    ^bb0(%it: {P4}):\n      %c = pphlo.constant dense<true> : tensor<i1>\n'
    f'      pphlo.return %c : tensor<i1>\n    }}, {{\n    ^bb0(%it: {P4}):\n      pphlo.return VALUE : TYPE\n'
    f'    }}) : ({P4}) -> RESULT')


def loop_module(value: str, value_type: str, result: str) -> str:
    body = LOOP_YIELDING.replace("VALUE", value).replace("TYPE", value_type).replace("RESULT", result)
    return (f"module @m {{\n  func.func @main(%arg0: {S4}, %arg1: tensor<f32>, %arg2: {P4}) -> {S4} {{\n"
            f"    %0 = pphlo.add %arg0, %arg0 : {S4}\n    {body}\n    return %0 : {S4}\n  }}\n}}\n")


def test_a_secret_returned_by_a_region_into_a_public_result_is_found():
    """An independent review's probe: the secret leaves through the loop body's return, with no op inside taking a
    secret to a public value; its parent's public result is the declassification. Kept secret, it is not one."""
    found = declassifications(loop_module("%0", S4, P4))
    assert len(found) == 1 and "secret returned by a region, public result" in found[0]
    assert declassifications(loop_module("%0", S4, S4)) == []
    assert declassifications(loop_module("%it", P4, P4)) == []


@pytest.mark.parametrize("tail", [
    f"^bb1:\n      pphlo.return %it : {P4}",  # a second block
    f"%n = pphlo.negate %it : {P4}",  # an op after the return
])
def test_a_region_must_be_one_block_ending_in_a_return(tail):
    """An independent review: the check reads what a region's last op returns, so a region whose return is not its
    last op could hand a secret on unseen; such a region (SPU makes none) is refused."""
    ir = loop_module("%0", S4, P4).replace(f"pphlo.return %0 : {S4}\n", f"pphlo.return %0 : {S4}\n      {tail}\n")
    with pytest.raises(IrAuditError, match="a region of other than one block ending in a return"):
        declassifications(ir)


def test_what_a_region_hands_on_taints_only_its_own_result():
    """A function's public result beside a secret one that a loop body hands on (a secret of the outer scope): the
    public one is not derived from secrets, so the helper returning it is no finding; handing the secret on to the
    public result is (and taints it)."""
    def helper(returned):
        return (f"  func.func private @h(%s: {S4}, %p: {P4}) -> ({P4}, {S4}) {{\n"
                f'    %w:2 = "pphlo.while"(%p, %p) ({{\n    ^bb0(%i: {P4}, %j: {P4}):\n'
                f"      %c = pphlo.constant dense<true> : tensor<i1>\n      pphlo.return %c : tensor<i1>\n    }}, {{\n"
                f"    ^bb0(%i: {P4}, %j: {P4}):\n      pphlo.return {returned}\n    }}) : ({P4}, {P4}) -> ({P4}, {S4})\n"
                f"    return %w#0, %w#1 : {P4}, {S4}\n  }}\n")
    call = f"    %c:2 = func.call @h(%0, %arg2) : ({S4}, {P4}) -> ({P4}, {S4})"
    ir = lambda returned: loop_module("%0", S4, S4).replace(  # noqa: E731
        "module @m {\n", "module @m {\n" + helper(returned)).replace("    return %0", call + "\n    return %0")
    kept = declassifications(ir(f"%i, %s : {P4}, {S4}"))  # (the call itself is refused: a secret in, a public out)
    assert not any("@h returns" in f or "returned by a region" in f for f in kept)
    found = declassifications(ir(f"%s, %s : {S4}, {S4}"))
    assert any("secret returned by a region" in f for f in found)
    assert any("@h returns public value #0 derived from secrets" in f for f in found)


def test_a_region_is_judged_result_by_result():
    """A loop with a public counter and a secret carry (what jax's fori_loop makes): its body hands each result its own
    kind, so that is no region's declassification (the audit refuses such a loop all the same, conservatively: a
    secret operand and a public result; SPU prints loops in a form it does not parse, and our programs have none);
    the secret handed to the counter's result is one."""
    pair = f"({P4}, {S4})"
    loop = (f'%w:2 = "pphlo.while"(%arg2, %0) ({{\n    ^bb0(%i: {P4}, %v: {S4}):\n'
            f'      %c = pphlo.constant dense<true> : tensor<i1>\n      pphlo.return %c : tensor<i1>\n    }}, {{\n'
            f'    ^bb0(%i: {P4}, %v: {S4}):\n      pphlo.return RETURNED\n    }}) : {pair} -> {pair}')
    program = lambda returned: (  # noqa: E731
        f"module @m {{\n  func.func @main(%arg0: {S4}, %arg1: tensor<f32>, %arg2: {P4}) -> {S4} {{\n"
        f"    %0 = pphlo.add %arg0, %arg0 : {S4}\n    {loop.replace('RETURNED', returned)}\n"
        f"    return %w#1 : {S4}\n  }}\n}}\n")
    kept = declassifications(program(f"%i, %v : {P4}, {S4}"))
    assert kept and not any("returned by a region" in f for f in kept)
    leaked = declassifications(program(f"%v, %v : {S4}, {S4}"))
    assert sum("secret returned by a region, public result" in f for f in leaked) == 1


@pytest.mark.parametrize("tail", ["garbage", "\nmodule {}", "}", "%1 = pphlo.negate %0 : tensor<f32>",
                                  "#loc = something", "\x00"])
def test_appended_text_is_refused(small_ir, tail):
    with pytest.raises(IrAuditError):
        declassifications(small_ir + tail)


def test_undefined_use_and_undefined_region_value_are_refused(small_ir):
    with pytest.raises(IrAuditError, match="undefined value %4242"):
        declassifications(insert_in_main(small_ir, f"    %900 = pphlo.negate %4242 : {SECRET_ARG}"))
    region_value = re.search(r"pphlo\.return (%\d+)", small_ir)[1]  # defined inside the reducer only
    with pytest.raises(IrAuditError, match=f"undefined value {region_value}"):
        declassifications(insert_in_main(small_ir, f"    pphlo.free {region_value} : tensor<!pphlo.secret<f32>>"))


def test_locations_and_comments_are_understood(small_ir):
    located = small_ir.replace(f" : {SECRET_ARG}\n", f' : {SECRET_ARG} loc("x.py":1:2) // note\n')
    located = located.replace("module @", '#loc1 = loc("x.py":3:4)\nmodule @') + "#loc2 = loc(#loc1)\n"
    assert located.count("loc(") > 3
    audit(located)
