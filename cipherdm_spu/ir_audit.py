"""Static check of compiled SPU IR: does anything secret become public before the end?

In pphlo every value's type says whether it is secret (``!pphlo.secret<...>``) or public. A value that
goes from secret to public is a reveal (declassification); an executable whose outputs are public
reveals them at the end of the run. `declassifications` lists both, so a test can require that a
sampling step reveals nothing at all (the final image is revealed separately, by the user's request).
"""

from __future__ import annotations

import re

_SIGNATURE = re.compile(r":\s*\((?P<ins>.*)\)\s*->\s*(?P<outs>.*)$")
_MAIN = re.compile(r"func\.func @main\((?P<args>.*)\)\s*->\s*(?P<outs>.*?)\s*\{?\s*$")
_TENSOR = re.compile(r"tensor<[^<>]*(?:<[^<>]*>)?[^<>]*>")


def _public_tensors(types: str) -> list[str]:
    return [t for t in _TENSOR.findall(types) if "secret" not in t]


def declassifications(mlir: str) -> list[str]:
    """The IR lines where a secret value becomes public, plus public outputs of @main."""
    found = []
    for line in mlir.splitlines():
        text = line.strip()
        main = _MAIN.search(text)
        if main:
            found += [f"public output {t}" for t in _public_tensors(main["outs"])]
            continue
        if "reveal" in text or "declassify" in text:
            found.append(text)
            continue
        sig = _SIGNATURE.search(text)
        if sig and "secret" in sig["ins"] and _public_tensors(sig["outs"]):
            found.append(text)
    return found
