"""What `cipherdm`'s softmax forms trade on a whole step: bytes against send actions (issue 26's MNIST byte cap).

`cipherdm` gives each softmax call the form (the row max's tournament levels, and whether the numbers the row sums
divide ride in their reciprocal's first round) that takes the least time on the benchmark's WAN
(`tournament_levels`, `fold_exps_pays` in `protocols/cipherdm.py`). Other forms send fewer bytes in more send
actions. `call_frontier` lists, by the same cost model of SPU's blocks, every form of a call that no other beats in
both; `measure_frontier` runs a step with each of them in turn (a kernel registered per form: `form_kernel`), beside
`spu` and `cipherdm` in the same run, so the step's own bytes, send actions and WAN estimate show what each trade
buys. The forms are of the step's softmax calls, which must share one row length and values' width (a step whose
calls differ would want a form per call).
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional

import numpy as np

from . import registry
from .benchmark import StepCase, measure_step, nonlinear_calls, ratios
from .protocols.cipherdm import (
    PUBLIC_PRODUCT,
    SECRET_PRODUCT,
    fold_exps_pays,
    pareto_front,
    softmax_in_form,
    tournament_cost,
    tournament_frontier,
    tournament_levels,
)
from .session import SecureSession

SET = "cipherdm"


class SoftmaxForm(NamedTuple):
    """A softmax call's form and the cost model's price of the parts in which forms differ, the row max (`level_cost`)
    and the division by the row sums (`division_cost`): the busiest party's send actions and a mean party's bytes for
    the whole call."""

    levels: tuple
    fold_exps: bool
    modelled_send_actions: int
    modelled_bytes: float

    @property
    def label(self) -> str:
        levels = "-".join(f"{k}&{r}" if r else f"{k}" for k, r in self.levels)
        return f"{levels}, {'folded' if self.fold_exps else 'apart'}"

    def record(self) -> dict:
        """The form as a results file keeps it."""
        return {"label": self.label, "levels": [list(level) for level in self.levels], "fold_exps": self.fold_exps,
                "modelled_send_actions": self.modelled_send_actions, "modelled_bytes": self.modelled_bytes}


class SoftmaxCallShape(NamedTuple):
    """The softmax calls of a step: how many, their rows' length and count per call, and the values' width (0 where
    a call divides its exps, no values)."""

    calls: int
    width: int
    rows: int
    values_width: int

    @property
    def divided(self) -> int:
        """The numbers a call divides by its row sums: a row's exps, or its weighted sum of the values."""
        return self.rows * (self.values_width or self.width)


def step_softmax_shape(case: StepCase) -> SoftmaxCallShape:
    """The one shape every softmax call of ``case`` has; ValueError where the step has none, or several."""
    with registry.use_protocol(SET):
        calls = [c for c in nonlinear_calls(case.secure_fn, case.weights, *case.inputs) if c.op == "softmax"]
    shapes = set()
    for call in calls:
        axis = call.params["axis"] % len(call.shape)
        width = call.shape[axis]
        values_width = call.other_shapes[0][-1] if call.other_shapes else 0
        shapes.add((width, int(np.prod(call.shape)) // width, values_width))
    if len(shapes) != 1:
        raise ValueError(f"{case.name}: the softmax calls' (row length, rows, values' width) are {sorted(shapes)}; "
                         "a frontier of one form for every call needs exactly one")
    (width, rows, values_width), = shapes
    return SoftmaxCallShape(len(calls), width, rows, values_width)


def division_cost(fold_exps: bool, shape: SoftmaxCallShape) -> tuple:
    """(send actions beyond the folded form's, a mean party's bytes) of a call's division by its row sums, counted off
    `_octave_polynomial`'s secret products: folded, every divided number rides in the reciprocal's three rounds (R
    times it; R u and c0 R; the last product: four products a number) beside the row's own two (x times its octave's
    factor, c2 u); apart, the reciprocal alone takes four products a row and a public one, its scaling down (two
    send actions more), and the division one product a divided number (three more)."""
    if fold_exps:
        return 0, SECRET_PRODUCT.bytes * (4 * shape.divided + 2 * shape.rows)
    return (SECRET_PRODUCT.actions + PUBLIC_PRODUCT.actions,
            SECRET_PRODUCT.bytes * (shape.divided + 4 * shape.rows) + PUBLIC_PRODUCT.bytes * shape.rows)


def _form(levels, fold_exps: bool, tournament_actions: int, tournament_bytes: float,
          shape: SoftmaxCallShape) -> SoftmaxForm:
    actions, division_bytes = division_cost(fold_exps, shape)
    return SoftmaxForm(tuple(levels), fold_exps, tournament_actions + actions,
                       shape.rows * tournament_bytes + division_bytes)


def kernel_form(shape: SoftmaxCallShape) -> SoftmaxForm:
    """The form `cipherdm`'s kernel takes for calls of ``shape``, priced as `call_frontier` prices forms (chosen for
    its time on the WAN, compute included, it need not be on the frontier)."""
    levels = tournament_levels(shape.width, shape.rows * shape.width)
    actions, per_element, _ = tournament_cost(shape.width, levels)
    return _form(levels, fold_exps_pays(shape.divided), actions, per_element * shape.width, shape)


def call_frontier(shape: SoftmaxCallShape) -> List[SoftmaxForm]:
    """Every form of a call of ``shape`` that no other beats in both modelled send actions and bytes, fewest send
    actions first: each tournament on `tournament_frontier`, folded and apart."""
    forms = [_form(levels, fold, actions, row_bytes, shape)
             for actions, row_bytes, levels in tournament_frontier(shape.width) for fold in (True, False)]
    front = pareto_front([(f.modelled_send_actions, f.modelled_bytes, f) for f in forms])
    return [point[2] for point in front]


def form_kernel(form: SoftmaxForm) -> str:
    """Register `cipherdm`'s softmax in ``form`` for every call, and return the kernel's name (an override)."""
    name = f"{SET}-form[{form.label}]"

    def kernel(x, axis: int, exp_impl: str, scale: float = 1.0, values=None):
        return softmax_in_form(x, axis, exp_impl, form.levels, form.fold_exps, scale, values)

    registry.register_kernel("softmax", name, kernel)
    return name


def measure_frontier(case: StepCase, forms: List[SoftmaxForm], repeat: int = 3,
                     progress: Optional[Callable[[str], None]] = None) -> Dict[str, dict]:
    """``case``'s step under `spu`, under `cipherdm`, and under `cipherdm` with its softmax in each of ``forms``
    (`measure_step`, the median seconds of ``repeat`` runs), keyed by set or override kernel, with ratios against
    `spu`; ``progress`` is called with each key once its step is measured."""
    runs = [(registry.BASELINE, registry.BASELINE, {}, None), (SET, SET, {}, None)]
    runs += [(kernel, SET, {"softmax": kernel}, form) for form, kernel in ((f, form_kernel(f)) for f in forms)]
    rows = {}
    for name, protocol_set, overrides, form in runs:
        with SecureSession(protocol_set, overrides) as session:
            row = measure_step(session, case, repeat=repeat, breakdown=False)
        if progress:
            progress(name)
        if form is not None:
            row["form"] = form.record()
        rows[name] = row
    ratios(rows)
    return rows


def verdicts(rows: Dict[str, dict], cap_bytes: float, wan_ratio: float) -> Dict[str, dict]:
    """Per measured row (but `spu`'s), whether it keeps to the byte cap (all parties' bytes) and reaches the WAN
    estimate's ratio against `spu`."""
    return {name: {"within_cap": row["bytes_sent"] <= cap_bytes,
                   "reaches_wan_ratio": row[f"vs_{registry.BASELINE}"]["WAN"] >= wan_ratio}
            for name, row in rows.items() if name != registry.BASELINE}
