"""Batched matrix products in the form SPU communicates least for.

SPU 0.9.5 runs a product with batch dimensions (attention's heads: q k^T, and the probabilities times v) as one
matrix product per batch element, each with its own reshare and truncation: send actions grow with the batch
(tests/test_linalg.py compares the two forms). For B batch elements a @ b, with a (B, m, k) and b (B, k, n), is also ONE product:

    [a_1 | a_2 | ... | a_B]  (m, B k)   @   blockdiag(b_1, ..., b_B)  (B k, B n)   =   [a_1 b_1 | ... | a_B b_B]

whose outputs are exactly the B products' (the same bytes to reshare and truncate) for one product's send actions,
at B times the local multiply-adds (the zero blocks). `batched_matmul` takes that form where those extra
multiply-adds stay below MAX_EXTRA_MULTIPLY_ADDS, and SPU's own batched product above (SD v1.5's 4096-wide
attention would multiply its local work by its 16 batch elements for a few seconds of round trips). A cost model
that prices a call by fewer of its rows (`cipherdm_spu.benchmark.softmax_call_cost`) sets the full call's row count
with `rows_of_full_call`, so that the reduced call takes the full call's form.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax.numpy as jnp

from . import registry
from .ring import bit_times

#: Above this many extra local multiply-adds (of the zero blocks) a batched product keeps SPU's per-element form.
MAX_EXTRA_MULTIPLY_ADDS = 2**27
_FULL_ROWS = contextvars.ContextVar("cipherdm_spu_full_rows", default=None)
_PER_ELEMENT = contextvars.ContextVar("cipherdm_spu_per_element", default=False)


def block_diagonal_pays(batch: int, m: int, k: int, n: int) -> bool:
    """Whether `batched_matmul` takes the block-diagonal form for ``batch`` products (m, k) @ (k, n)."""
    return batch > 1 and (batch - 1) * batch * m * k * n <= MAX_EXTRA_MULTIPLY_ADDS


@contextlib.contextmanager
def per_element_products():
    """Within it, `batched_matmul` keeps SPU's per-element form: a cost model measuring small models for a large one
    whose products all exceed the limit (`scripts/sd_cost_estimate.py`)."""
    token = _PER_ELEMENT.set(True)
    try:
        yield
    finally:
        _PER_ELEMENT.reset(token)


@contextlib.contextmanager
def rows_of_full_call(rows: int):
    """Within it, `batched_matmul` chooses its form as for ``rows`` rows of its left operand (a priced call's)."""
    token = _FULL_ROWS.set(int(rows))
    try:
        yield
    finally:
        _FULL_ROWS.reset(token)


def _block_diagonal(b):
    """blockdiag(b_1, ..., b_B) (B k, B n) from b (B, k, n): b times a public 0/1 integer pattern (`bit_times`: on
    its ring encoding under SPU, local, no truncation), so that the zero blocks are exact zeros."""
    batch, k, n = b.shape
    eye = jnp.eye(batch, dtype=jnp.int32)[:, None, :, None]  # (B, 1, B, 1)
    return bit_times(eye, b[:, :, None, :]).reshape(batch * k, batch * n)


def batched_matmul(a, b):
    """a @ b over matching leading (batch) dimensions, a (..., m, k), b (..., k, n): under SPU as one block-diagonal
    product where its extra local work is small (module docstring), else as the batched product."""
    *lead, m, k = a.shape
    n = b.shape[-1]
    batch = math.prod(lead)
    sized_rows = m if _FULL_ROWS.get() is None else _FULL_ROWS.get()
    if registry.fixed_point_bits() is None or _PER_ELEMENT.get() or not block_diagonal_pays(batch, sized_rows, k, n):
        return jnp.matmul(a, b)
    rows = jnp.moveaxis(a.reshape(batch, m, k), 0, 1).reshape(m, batch * k)  # [a_1 | ... | a_B]
    out = rows @ _block_diagonal(b.reshape(batch, k, n))  # (m, B n): [a_1 b_1 | ... | a_B b_B]
    return jnp.moveaxis(out.reshape(m, batch, n), 1, 0).reshape(*lead, m, n)
