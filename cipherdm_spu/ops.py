"""The nonlinear ops of a diffusion model, as JAX primitives whose kernels the protocol set chooses.

Each op binds a primitive carrying ``impl``, the kernel name chosen by the protocol set in force at trace
time (see `cipherdm_spu.registry`); softmax also carries ``exp_impl``, the set's exp, which every softmax
kernel uses; and every op ``loop_body``, whether it was bound under `registry.loop_body` (the kernel is then lowered
under it too, in a form a loop computes right). The primitive's lowering emits that kernel's JAX code, so SPU
compiles ordinary HLO; with no protocol set in force the vanilla kernels (`cipherdm_spu.protocols.vanilla`) are used, so a model built on
these ops also runs unchanged under plain ``jax.jit`` and ``jax.grad``.

Caution: ``jax.jit`` caches a trace per function object, not per active protocol set, so a function
jitted under one set keeps that set's kernels when called under another (and its ``loop_body``, when called in a loop's
body); `SecureSession` traces a fresh wrapper per compile, and plain-JAX users should jit one wrapper per protocol set.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax.interpreters import ad, batching, mlir

try:  # jax >= 0.4.36 moved Primitive here
    from jax.extend.core import Primitive
except ImportError:  # pragma: no cover - depends on the jax version
    from jax.core import Primitive
from jax.core import ShapedArray

from . import registry
from .linalg import batched_matmul

_PRIMITIVES: dict[str, Primitive] = {}
#: Primitive params chosen at trace time (the protocol set's kernel names; whether the op is in a loop's body); the
#: others are the op's own.
KERNEL_PARAMS = ("impl", "exp_impl", "loop_body")
#: The keyword names of the operands an op takes after its input, in a jaxpr's order (`replay` passes them so).
FURTHER_OPERANDS = {"rsqrt": ("times",), "softmax": ("values",)}


def _takes_values(kernel) -> bool:
    """Whether a softmax kernel takes ``values`` itself (a parameter of that name, not a catch-all ``**params``)."""
    parameter = inspect.signature(kernel).parameters.get("values")
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def softmax_kernel_call(kernel, params):
    """A softmax kernel as the op calls it, on the logits and optionally the values: ``kernel(x, values=values,
    **params)`` where the kernel takes ``values``, else its probabilities times them here (a kernel written for
    probabilities alone keeps working)."""
    def call(x, *values):
        if not values:
            return kernel(x, **params)
        if _takes_values(kernel):
            return kernel(x, values=values[0], **params)
        return batched_matmul(kernel(x, **params), values[0])
    return call


def _softmax_shape(x_shape, *values_shapes):
    """softmax's result: the logits' shape, or with values (..., q, k) rows weighing (..., k, d): (..., q, d)."""
    return x_shape if not values_shapes else x_shape[:-1] + values_shapes[0][-1:]


def _define(op: str, *, axis_param: bool = False, kernel_call=None, result_shape=jnp.broadcast_shapes) -> Primitive:
    """Create the primitive for ``op`` with eager, abstract-eval, lowering, JVP and batching rules.

    By default its operands broadcast against each other (numpy rules) and the kernel takes them positionally; the
    result has ``result_shape`` of the operands' shapes (their broadcast shape) and the first operand's dtype.
    ``kernel_call(kernel, params)`` gives the kernel as the op calls it where that differs (softmax's values)."""
    prim = Primitive(f"cipherdm_{op}")

    def kernel_fn(impl, params):
        params = dict(params)
        if params.pop("loop_body", False):  # bound in a loop's body: lowered (later) as one
            fn = kernel_fn(impl, params)

            def in_loop_body(*args):
                with registry.loop_body():
                    return fn(*args)
            return in_loop_body
        if kernel_call is not None:
            return kernel_call(registry.kernel(op, impl), params)
        return functools.partial(registry.kernel(op, impl), **params)

    def impl_rule(*args, impl, **params):
        return kernel_fn(impl, params)(*args)

    def abstract_eval(*args, impl, **params):
        return ShapedArray(tuple(result_shape(*(a.shape for a in args))), args[0].dtype)

    def lowering(ctx, *args, impl, **params):
        return mlir.lower_fun(kernel_fn(impl, params), multiple_results=False)(ctx, *args)

    def jvp(primals, tangents, *, impl, **params):
        return jax.jvp(kernel_fn(impl, params), primals, tuple(ad.instantiate_zeros(t) for t in tangents))

    def batch(args, dims, *, impl, **params):
        if axis_param and len(args) == 2 and dims[0] is None:  # the same logits weigh a batch of values: the batch
            # joins the values' width, so the rows' max, exps and sums are computed once, not once per batch element
            x, values = args
            values = jnp.moveaxis(values, dims[1], -2)  # (..., k, B, d)
            *lead, k, size, d = values.shape
            out = prim.bind(x, values.reshape(*lead, k, size * d), impl=impl, **params)  # (..., q, B * d)
            return jnp.moveaxis(out.reshape(*out.shape[:-1], size, d), -2, 0), 0
        if axis_param:  # the batch dimension in front of every operand (an unbatched one broadcast along it), and the
            # reduction axis shifted past it
            size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
            lined_up = [batching.moveaxis(a, d, 0) if d is not None else jnp.broadcast_to(a, (size,) + a.shape)
                        for a, d in zip(args, dims)]
            return prim.bind(*lined_up, impl=impl, **dict(params, axis=params["axis"] + 1)), 0
        # the batch dimension in front of every operand, each padded to the result's rank so that they broadcast
        rank = max(a.ndim - (d is not None) for a, d in zip(args, dims))
        lined_up = []
        for a, d in zip(args, dims):
            a = batching.moveaxis(a, d, 0) if d is not None else a[None]
            lined_up.append(a.reshape(a.shape[:1] + (1,) * (rank + 1 - a.ndim) + a.shape[1:]))
        return prim.bind(*lined_up, impl=impl, **params), 0

    prim.def_impl(impl_rule)
    prim.def_abstract_eval(abstract_eval)
    mlir.register_lowering(prim, lowering)
    ad.primitive_jvps[prim] = jvp
    batching.primitive_batchers[prim] = batch
    _PRIMITIVES[op] = prim
    return prim


_silu_p = _define("silu")
_mish_p = _define("mish")
_gelu_p = _define("gelu")
_sigmoid_p = _define("sigmoid")
_softmax_p = _define("softmax", axis_param=True, kernel_call=softmax_kernel_call, result_shape=_softmax_shape)
_exp_p = _define("exp")
_rsqrt_p = _define("rsqrt")


def _bind(prim: Primitive, op: str, *operands, **params):
    operands = [jnp.asarray(x) for x in operands]
    for x in operands:
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"cipherdm_spu.ops.{op} needs floating-point inputs, got {x.dtype}")
    return prim.bind(*operands, impl=registry.active_impl(op), loop_body=registry.in_loop_body(), **params)


def silu(x):
    """x * sigmoid(x) (a.k.a. swish)."""
    return _bind(_silu_p, "silu", x)


def mish(x):
    """x * tanh(softplus(x))."""
    return _bind(_mish_p, "mish", x)


def gelu(x, approximate: bool = False):
    """Gaussian error linear unit; ``approximate`` selects the tanh form, as in jax.nn.gelu."""
    return _bind(_gelu_p, "gelu", x, approximate=bool(approximate))


def sigmoid(x):
    return _bind(_sigmoid_p, "sigmoid", x)


def softmax(x, axis: int = -1, scale: float = 1.0, *, values=None):
    """softmax(scale * x) over one axis: exp(scale (x - max)) / sum(exp(scale (x - max))), with ``scale`` a public
    constant > 0 (attention's 1 / sqrt(d)), which a kernel can fold into its exp's own input product where plain
    arithmetic spends a truncation on it; its exp is the protocol set's (op ``exp``). A softmax kernel is therefore
    called as ``kernel(x, axis=axis, exp_impl=exp_impl, scale=scale)``.

    With ``values`` (attention's v, shaped (..., k, d) for x shaped (..., q, k), the rows on the last axis) the result
    is softmax(scale * x) @ values, (..., q, d): a kernel that takes ``values=`` itself may divide by the row sums
    after the product, e @ values / sum(e), on q * d numbers instead of q * k; for one that does not, the product
    follows its probabilities."""
    x = jnp.asarray(x)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"softmax axis {axis} out of range for an array of rank {x.ndim}")
    scale = float(scale)
    if not 0 < scale < float("inf"):
        raise ValueError(f"softmax's scale must be a finite number > 0, got {scale}")
    operands = (x,)
    if values is not None:
        values = jnp.asarray(values)
        if axis % x.ndim != x.ndim - 1 or x.ndim < 2:
            raise ValueError(f"softmax with values weighs rows on the last axis of logits of rank >= 2, not axis {axis} "
                             f"of rank {x.ndim}")
        if values.ndim != x.ndim or values.shape[:-2] != x.shape[:-2] or values.shape[-2] != x.shape[-1]:
            raise ValueError(f"softmax's values must be shaped (..., {x.shape[-1]}, d) with the logits' leading "
                             f"dimensions {x.shape[:-2]}, got {values.shape}")
        operands = (x, values.astype(x.dtype))
    return _bind(_softmax_p, "softmax", *operands, axis=axis % x.ndim, exp_impl=registry.active_impl("exp"),
                 scale=scale)


def exp(x):
    """e^x; the secure kernels are built for softmax's domain, x <= 0."""
    return _bind(_exp_p, "exp", x)


def rsqrt(x, times=None, *, scale: float = 1.0):
    """times / sqrt(scale * x) for x > 0, with ``scale`` a public constant > 0 and ``times`` (default 1) a
    factor broadcast against x (cast to x's dtype): a norm's ``1 / sqrt(sum / count)`` times its affine weight,
    which a kernel can fold into its own rounds (the division into its coefficients, the weight into a product
    it makes anyway) where plain arithmetic spends a truncation and a product on them. An rsqrt kernel is
    therefore called as ``kernel(x, *times, scale=scale)``: ``def kernel(x, times=None, *, scale=1.0)``."""
    scale = float(scale)
    if not scale > 0 or scale == float("inf"):
        raise ValueError(f"rsqrt's scale must be a finite number > 0, got {scale}")
    x = jnp.asarray(x)
    operands = (x,) if times is None else (x, jnp.asarray(times).astype(x.dtype))  # the result has x's dtype
    return _bind(_rsqrt_p, "rsqrt", *operands, scale=scale)


def relu(x):
    """max(x, 0): one comparison in every protocol set, so it needs no registered kernel."""
    return jnp.maximum(x, 0.0)


def replay(op: str, operands, params: dict):
    """``op`` called again on a recorded call's operands (its input, then FURTHER_OPERANDS) with its own params."""
    x, *further = operands
    return globals()[op](x, **dict(zip(FURTHER_OPERANDS.get(op, ()), further)), **params)


def primitive(op: str) -> Primitive:
    """The JAX primitive behind ``op``: how a jaxpr names it, and how to bind a recorded call again."""
    return _PRIMITIVES[op]
