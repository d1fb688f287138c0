"""Products by public constants that SPU 0.9.5 would compute with another constant: refused at compile time.

SPU encodes a public float constant c as trunc(c * 2**f) on its fixed-point grid (f fraction bits), so a constant
below 4 units of 2**-f that is not on that grid loses most of its value: 0.7 units becomes 0, 1.5 becomes 1, 3.9
becomes 3. Only one case gets extra precision: a *splat* constant (one value, every element) that is itself an
operand of ``pphlo.multiply`` (our kernels rely on it: the masked-square SiLU truncates by 2**-28 so,
`protocols.cipherdm._masked_square_base`). Anything else is computed with the truncated encoding and no error is
raised. Measured (tests/test_public_constants.py): a non-splat constant and, above all, a constant in a loop's body, which SPU's compiler hoists out of the loop and hands to the body through
``pphlo.broadcast_as``: a sampler written as one ``jax.lax.fori_loop`` of steps came out wrong for this reason (the
SiLU's 2**-28 became 0; traced under `registry.loop_body` our kernels avoid such constants). Taken to behave alike:
a constant reached through a broadcast, a reshape, a slice or another op that passes values on, and a constant of
an enclosing region used in a loop's body directly.

`imprecise_products` finds every ``pphlo.multiply``, ``pphlo.dot`` and ``pphlo.convolution`` with such an
operand in a compiled program's text; `check` raises `ProgramError` naming them. On-grid constants (2**-17 is
exactly 2 units) and constants of 4 units or more keep SPU's usual rounding and are not reported; a changed one is
refused whatever its weight in the result.

A guard for programs this project compiles (SPU's printed form, one op a line), not a security check: a line it
cannot read is passed over (the security audit of a party's IR is `ir_audit`).
"""

from __future__ import annotations

import re
import struct
from typing import Dict, List, Optional

from .errors import ProgramError

#: a constant below this many units of 2**-f gets SPU's extra precision only as a splat operand of a multiply
TINY_UNITS = 4
#: ops that pass a constant's values on unchanged (rearranged, repeated or cut): a product through them is not by
#: a direct constant
_PASS_THROUGH = {"broadcast", "broadcast_as", "reshape", "transpose", "slice", "dynamic_slice", "concatenate", "pad",
                 "reverse", "convert"}
_PRODUCTS = {"multiply", "dot", "convolution", "dot_general"}
_FLOAT = {"f16": "e", "f32": "f", "f64": "d"}

_DEF = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?\s*=\s*pphlo\.(\w+)\b(.*)$")
_CONSTANT = re.compile(r"dense<(.*)>\s*:\s*tensor<(?:\d+x)*(\w+)>\s*$")
_VALUE = re.compile(r"%[\w.$-]+")
_CARRIED = re.compile(r"(%[\w.$-]+)\s*=\s*(%[\w.$-]+)")


def _floats(payload: str, element: str) -> Optional[List[float]]:
    """The elements of a ``dense<...>`` payload of a float type (one for a splat), or None if it is not one."""
    fmt = _FLOAT.get(element)
    if fmt is None:
        return None
    size = struct.calcsize(fmt)
    if payload.startswith('"0x'):  # raw little-endian data
        data = bytes.fromhex(payload[3:-1])
        return [v for (v,) in struct.iter_unpack("<" + fmt, data)] if len(data) % size == 0 else None
    values = []
    for word in payload.replace("[", " ").replace("]", " ").replace(",", " ").split():
        if word.lower().startswith("0x"):  # a bit pattern (inf, nan)
            values.append(struct.unpack("<" + fmt, int(word, 16).to_bytes(size, "little"))[0])
        else:
            try:  # MLIR prints the shortest decimal that reads back as the element: read it back so
                values.append(struct.unpack("<" + fmt, struct.pack("<" + fmt, float(word)))[0])
            except (ValueError, OverflowError):
                return None
    return values


def _off_grid_tiny(values: List[float], fraction_bits: int) -> List[float]:
    """The values SPU's encoding would change by more than it rounds: nonzero, below TINY_UNITS units of 2**-f, and
    not on the grid."""
    scale = 2.0**fraction_bits
    return [v for v in values
            if v == v and 0 < abs(v) * scale < TINY_UNITS and abs(v) * scale != int(abs(v) * scale)]


class _Value:
    """What the check knows of one SSA value: the off-grid tiny elements it carries from a constant, and whether it
    is that constant itself as a splat (the one form SPU multiplies at extra precision)."""

    __slots__ = ("tiny", "direct_splat", "line")

    def __init__(self, tiny: List[float], direct_splat: bool, line: int):
        self.tiny, self.direct_splat, self.line = tiny, direct_splat, line


def imprecise_products(text: str, fraction_bits: int) -> List[str]:
    """One line per product in the pphlo ``text`` whose operand holds a constant that SPU would multiply as another
    value (see the module's docstring), with the constant's line and offending values."""
    scopes: List[Dict[str, _Value]] = [{}]

    def find(name: str) -> Optional[_Value]:
        for depth, scope in enumerate(reversed(scopes)):
            if name in scope:
                v = scope[name]
                # a constant of an enclosing region, used in a nested one (a loop's body), is not taken for the
                # multiply's own operand: SPU's compiler may hand it in through broadcast_as
                return v if depth == 0 or not v.direct_splat else _Value(v.tiny, False, v.line)
        return None

    found = []
    carried: Dict[int, Dict[str, _Value]] = {}  # per scope depth, the carried values of the loop last defined there
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("}"):
            scopes.pop()
            if len(scopes) == 0:
                scopes.append({})
        m = _DEF.match(line)
        if m:
            name, op, rest = m.groups()
            carried.pop(len(scopes), None)  # an op after a loop at its depth: that loop's regions are over
            if op == "while":  # a constant passed in as a carried value is a public variable in the body
                carried[len(scopes)] = {inner: _Value(v.tiny, False, v.line)
                                        for inner, v in ((i, find(o)) for i, o in _CARRIED.findall(rest.split(":")[0]))
                                        if v is not None}
            elif op == "constant":
                c = _CONSTANT.search(rest)
                values = _floats(c.group(1).strip(), c.group(2)) if c else None
                tiny = _off_grid_tiny(values, fraction_bits) if values else []
                if tiny:
                    scopes[-1][name] = _Value(tiny, len(values) == 1, number)
            else:
                operands = [v for v in (find(o) for o in _VALUE.findall(rest.split(":")[0])) if v is not None]
                if op in _PRODUCTS:
                    for v in operands:
                        if not (op == "multiply" and v.direct_splat):
                            found.append(f"line {number}: pphlo.{op} by the constant of line {v.line} "
                                         f"({', '.join(f'{t:.3g}' for t in v.tiny[:3])}"
                                         f"{', ...' if len(v.tiny) > 3 else ''})")
                elif op in _PASS_THROUGH and operands:
                    scopes[-1][name] = _Value(sum((v.tiny for v in operands), []), False, operands[0].line)
        if stripped.endswith("{"):
            regions_of_loop = stripped.startswith(("cond", "} do"))
            scopes.append(dict(carried.get(len(scopes), {})) if regions_of_loop else {})
    return found


def check(text: str, fraction_bits: int, what: str) -> None:
    """Raise `ProgramError` if ``what``'s compiled program multiplies by a constant SPU would change."""
    found = imprecise_products(text, fraction_bits)
    if found:
        raise ProgramError(
            f"{what}: SPU would multiply by a different constant than the program's ({len(found)} product(s)): a "
            f"constant below {TINY_UNITS} units of 2**-{fraction_bits} keeps its value only as a splat operand of a "
            "multiply, not in a loop's body (SPU's compiler hoists it out), a broadcast, a reshape or a non-splat "
            "array. Move the loop outside the program, trace its body under cipherdm_spu.registry.loop_body() (our "
            "kernels then take forms without such constants), or scale the constant up. " + "; ".join(found[:5]))
