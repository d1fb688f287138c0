"""Static audit of compiled SPU IR (pphlo MLIR text): does any secret value become public?

Every MPC party runs `audit` on each executable before it runs it. The parties are semi-honest and each
checks what it is handed itself, so the check must not depend on formatting: the whole text is
tokenised and parsed (not matched line by line), every SSA value gets the visibility of its type
(secret iff the type mentions ``!pphlo.secret``), and anything the parser does not understand -- unknown
syntax, a type it cannot classify, an undefined value or function, unbalanced brackets, a type that
disagrees with a value's definition, more than one module -- raises `IrAuditError`: a party refuses
what it cannot check (fail closed).

Reported as declassifications: any op, anywhere (inside regions, calls and custom calls too), with a
secret operand and a public result or region argument, or with a region that returns a secret and a public result;
any op whose name, symbols or attributes say
reveal/declassify/dbg_print; a function other than @main returning a public value derived from
secrets; and public results of @main (outputs stay secret: the final image is released separately,
as shares to its owner).
"""

from __future__ import annotations

import bisect
import re

from .errors import IrAuditError

__all__ = ["IrAuditError", "audit", "declassifications"]


_STR = r'"(?:[^"\\\n]|\\.)*"'
_TOKEN = re.compile(rf"""(?P<ws>\s+|//[^\n]*)|(?P<str>{_STR})|(?P<ssa>%[\w$.-]+(?:\#\d+)?)
    |(?P<sym>@[\w$.-]+|@{_STR})|(?P<label>\^[\w$.-]+)|(?P<arrow>->)
    |(?P<num>-?(?:0x[0-9A-Fa-f]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?))|(?P<id>[!#]?[A-Za-z_][\w$.]*)
    |(?P<p>[(){{}}\[\],:=<>*?+])""", re.X)
_STRING = re.compile(_STR)
_SCALAR = r"(?:[fi]\d+|bf16|ui\d+|index|complex<f\d+>)"
_ELEMENT = rf"(?:{_SCALAR}|!pphlo\.secret<{_SCALAR}>)"
_TYPE = re.compile(rf"tensor<(?:\d+x)*{_ELEMENT}>|{_ELEMENT}")
_REVEAL = re.compile(r"reveal|declassif|dbg_print", re.I)
_CLOSE = {"(": ")", "[": "]", "{": "}", "<": ">"}
PUBLIC, TAINTED, SECRET = 0, 1, 2  # a value's level; tainted: public, but computed from a secret


def _unescape(word: str) -> str:  # MLIR string escapes: \\, \", \n, \t, \XX (hex)
    return re.sub(r'\\([0-9A-Fa-f]{2}|.)', lambda m: chr(int(m[1], 16)) if len(m[1]) == 2 else m[1], word)


def _angle_end(text: str, i: int) -> int:
    """End of the balanced ``<...>`` at ``text[i]`` (brackets inside must balance; ``->`` is no '>')."""
    stack = []
    while i < len(text):
        c = text[i]
        if c == '"':
            m = _STRING.match(text, i)
            if not m:
                break
            i = m.end()
            continue
        if c in _CLOSE:
            stack.append(_CLOSE[c])
        elif c in ")]}" or (c == ">" and text[i - 1] != "-"):
            if stack.pop() != c:
                break
            if not stack:
                return i + 1
        i += 1
    raise IrAuditError(f"unbalanced '<' or brackets inside it near offset {i}")


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    """(kind, text, offset) over the whole text; ``tensor<..<..>>`` is one token; ``loc(...)`` dropped."""
    toks, i = [], 0
    while i < len(text):
        m = _TOKEN.match(text, i)
        if not m:
            raise IrAuditError(f"unexpected character {text[i]!r} at offset {i}")
        kind, start, i = m.lastgroup, i, m.end()
        if kind == "id" and text[i:i + 1] == "<":
            i = _angle_end(text, i)
        if kind == "id" and text[start:i] == "loc" and text[i:i + 1] == "(":  # a location: skip it
            depth = 0
            while (m := _TOKEN.match(text, i)) and m.lastgroup not in ("ssa", "label"):
                i, depth = m.end(), depth + {"(": 1, ")": -1}.get(m.group(), 0)
                if depth == 0:
                    break
            if depth or not m:
                raise IrAuditError(f"bad location at offset {start}")
            if len(toks) >= 2 and toks[-1][1] == "=" and toks[-2][1].startswith("#"):
                del toks[-2:]  # a location alias: #loc3 = loc(...)
        elif kind != "ws":
            toks.append((kind, text[start:i], start))
    return toks


class _Parser:
    def __init__(self, text: str):
        self.text, self.toks, self.i = text, _tokenize(text), 0
        self.newlines = [m.start() for m in re.finditer("\n", text)]
        self.scopes: list[dict[str, list[int]]] = [{}]  # SSA name -> levels of its results
        self.funcs: dict[str, tuple[list[int], list[int]]] = {}  # @name -> (argument, result) levels
        self.calls, self.found, self.public_outputs = [], [], []  # public_outputs: (k, of n, text)

    def peek(self, k: int = 0):
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else ("eof", "", len(self.text))

    def next(self):
        t = self.peek()
        if t[0] == "eof":
            raise self.error("unexpected end of the IR", t)
        self.i += 1
        return t

    def expect(self, text: str):
        if (t := self.next())[1] != text:
            raise self.error(f"expected {text!r}, found {t[1]!r}", t)
        return t

    def skip(self, text: str) -> bool:
        if self.peek()[1] == text:
            self.i += 1
            return True
        return False

    def where(self, tok) -> str:
        return f"line {bisect.bisect_left(self.newlines, tok[2]) + 1}"

    def error(self, message: str, tok) -> IrAuditError:
        return IrAuditError(f"{self.where(tok)}: {message}")

    # -- values, types, attributes -----------------------------------------------------------------
    def define(self, tok, levels: list[int]) -> None:
        if tok[0] != "ssa" or "#" in tok[1] or any(tok[1] in scope for scope in self.scopes):
            raise self.error(f"bad or repeated SSA definition {tok[1]!r}", tok)
        self.scopes[-1][tok[1]] = levels

    def use(self, tok) -> int:
        name, _, index = tok[1].partition("#")
        for scope in reversed(self.scopes):
            if name in scope:
                if int(index or 0) >= len(scope[name]):
                    raise self.error(f"{tok[1]} has no such result", tok)
                return scope[name][int(index or 0)]
        raise self.error(f"use of undefined value {tok[1]}", tok)

    def type(self) -> int:
        if (t := self.next())[0] != "id" or not _TYPE.fullmatch(t[1]):
            raise self.error(f"cannot classify type {t[1]!r}", t)
        return SECRET if "!pphlo.secret" in t[1] else PUBLIC

    def types(self, with_names: bool = False) -> list:
        """``(type, ...)`` or, with names, ``(%a: type, ...)``; each may carry an attribute dictionary."""
        self.expect("(")
        out = []
        while not self.skip(")"):
            if out:
                self.expect(",")
            name = self.next() if with_names else None
            if with_names:
                self.expect(":")
            out.append((name, self.type()) if with_names else self.type())
            if self.peek()[1] == "{":
                self.attributes()
        return out

    def result_types(self) -> list[int]:  # after '->'
        return self.types() if self.peek()[1] == "(" else [self.type()]

    def attributes(self) -> list[str]:
        """A dictionary ``{...}`` (or properties ``<{...}>``): balanced, holds no values; its words."""
        stack, words = [self.next()[1]], []
        while stack:
            t = self.next()
            if t[0] in ("ssa", "label"):
                raise self.error(f"{t[1]} inside an attribute", t)
            if t[0] in ("id", "sym", "str"):
                words.append(t[1])
            elif t[1] in _CLOSE:
                stack.append(t[1])
            elif t[1] in _CLOSE.values() and _CLOSE[stack.pop()] != t[1]:
                raise self.error(f"unbalanced {t[1]!r}", t)
        return words

    def is_region(self) -> bool:  # at '{': a dictionary starts with `key =`, `key,` or `}`
        first, second = self.peek(1), self.peek(2)
        return not (first[1] == "}" or first[0] in ("id", "str") and second[1] in ("=", ",", "}"))

    # -- structure ---------------------------------------------------------------------------------
    def module(self) -> None:
        self.expect("module")
        if self.peek()[0] == "sym":
            self.next()
        if self.skip("attributes"):
            self.attributes()
        self.expect("{")
        while not self.skip("}"):
            self.func()
        if self.peek()[0] != "eof":
            raise self.error("text after the module (one module only)", self.peek())
        if "@main" not in self.funcs:
            raise self.error("no @main function", self.peek())
        for tok, callee, ins, outs in self.calls:
            if callee not in self.funcs:
                raise self.error(f"call of undefined function {callee}", tok)
            if ([i == SECRET for i in ins], outs) != ([i == SECRET for i in self.funcs[callee][0]],
                                                      self.funcs[callee][1]):
                raise self.error(f"call of {callee} does not match its signature", tok)

    def func(self) -> None:
        self.expect("func.func")
        self.skip("private") or self.skip("public") or self.skip("nested")
        name = self.next()
        if name[0] != "sym" or name[1] in self.funcs:
            raise self.error(f"bad or repeated function name {name[1]!r}", name)
        args = self.types(with_names=True)
        outs = self.result_types() if self.skip("->") else []
        if self.skip("attributes"):
            self.attributes()
        self.funcs[name[1]] = ([level for _, level in args], outs)
        self.expect("{")
        last = self.region(args)[1]
        if last is None or last[0] not in ("return", "func.return") or len(last[1]) != len(outs):
            raise self.error(f"{name[1]} does not end in a return of its {len(outs)} results", name)
        for k, (declared, level) in enumerate(zip(outs, last[1])):
            if (declared == SECRET) != (level == SECRET):
                raise self.error(f"{name[1]} returns #{k} with another visibility than declared", last[2])
            if level == TAINTED and name[1] != "@main":
                self.found.append(f"{self.where(last[2])}: {name[1]} returns public value #{k} derived from secrets")
            if level != SECRET and name[1] == "@main":
                self.public_outputs.append((k, len(outs), f"{self.where(name)}: public output #{k} of @main"))

    def region(self, args) -> tuple[list[int], tuple | None, int]:
        """A region, after its '{', up to its '}': (levels of its block arguments, its last op, how many blocks)."""
        self.scopes.append({})
        levels, last, blocks = [], None, 1
        while True:
            for tok, level in args:
                self.define(tok, [level])
                levels.append(level)
            if self.skip("}"):
                break
            if self.peek()[0] == "label":  # a block: ^bb0(%a: type, ...):
                blocks += last is not None  # a label after an op starts another block
                self.next()
                args = self.types(with_names=True) if self.peek()[1] == "(" else []
                self.expect(":")
            else:
                last, args = self.op(), []
        self.scopes.pop()
        return levels, last, blocks

    def _nested(self, region: tuple, region_levels: list[int], returned: list[list[int]]) -> tuple[list[int], list]:
        """An op's regions so far with one more: its block arguments' levels, and (one list per region) the levels of
        the values its terminator hands on: a while's body or an if's branch, one per result of the op; a while's
        condition or a sort's comparator, a decision on them. A region must be one block ending in a return (what
        SPU's structured control flow makes): another could hand a value on past the check."""
        levels, last, blocks = region
        if blocks > 1 or last is None or last[0] not in ("pphlo.return", "return"):
            raise self.error("a region of other than one block ending in a return", last[2] if last else self.peek())
        return region_levels + levels, returned + [last[1]]

    @staticmethod
    def _handed(returned: list[list[int]], results: int) -> list[int]:
        """Per result of an op, the highest level its regions hand it: result by result where a region returns one
        value per result, else (a decision on them) the region's highest, to every result."""
        handed = [PUBLIC] * results
        for yields in returned:
            for k in range(results):
                handed[k] = max(handed[k], *(yields[k:k + 1] if len(yields) == results else yields), PUBLIC)
        return handed

    def op(self) -> tuple[str, list[int], tuple]:
        """One op, custom or generic form: [results =] name operands/attributes/regions : types [regions]."""
        results = []
        if self.peek()[0] == "ssa":  # %a, %b:2 =
            while not results or self.skip(","):
                tok = self.next()
                n = self.next() if self.skip(":") else (0, "1")
                if not n[1].isdigit() or int(n[1]) < 1:
                    raise self.error(f"bad result count {n[1]!r}", tok)
                results.append((tok, int(n[1])))
            self.expect("=")
        head = self.next()
        name = _unescape(head[1][1:-1]) if head[0] == "str" else head[1]
        if head[0] not in ("id", "str") or not re.fullmatch(r"(pphlo|func)\.[\w.$]+|return", name):
            raise self.error(f"expected a pphlo or func operation, found {head[1]!r}", head)
        words, uses, region_levels, returned, stack = [name], [], [], [], []
        while stack or self.peek()[1] != ":":  # operands, attributes, regions in generic form
            t = self.peek()
            if t[0] in ("eof", "label") or (not stack and t[1] in ("}", ")", "]")):
                raise self.error(f"unexpected {t[1] or 'end'!r} in {name} (unbalanced, or no ':' type)", t)
            if t[1] == "{" and self.is_region():
                self.next()
                region_levels, returned = self._nested(self.region([]), region_levels, returned)
            elif t[1] == "{" or (t[1] == "<" and self.peek(1)[1] == "{"):
                words += self.attributes()
            elif self.next()[0] == "ssa":
                if not stack and self.peek()[1] == "=":
                    raise self.error(f"{t[1]} defined inside {name} (no ':' type before it?)", t)
                uses.append(self.use(t))
            elif t[0] in ("id", "sym", "str"):
                words.append(t[1])
            elif t[1] in ("(", "["):
                stack.append(t[1])
            elif t[1] in (")", "]") and _CLOSE[stack.pop()] != t[1]:
                raise self.error(f"unbalanced {t[1]!r}", t)
        self.next()
        n_results = sum(count for _, count in results)
        if self.peek()[1] == "(":  # (operand types) -> result types
            ins = self.types()
            self.expect("->")
            outs = self.result_types()
        else:  # one type for all operands and the result, or the operand types of an op without results
            outs = [self.type()]
            while self.skip(","):
                outs.append(self.type())
            ins, outs = (outs, []) if not results else (outs * len(uses) if len(outs) == 1 else [], outs)
        start, end = (results[0][0] if results else head)[2], self.toks[self.i - 1]
        while True:  # trailing regions: `{...}` or `keyword(%a: type, ...) {...}`
            t = self.peek()
            if t[0] == "id" and "." not in t[1] and t[1] != "return" and self.peek(1)[1] == "(":
                words.append(self.next()[1])
                args = self.types(with_names=True)
            elif t[1] == "{":
                args = []
            else:
                break
            self.expect("{")
            region_levels, returned = self._nested(self.region(args), region_levels, returned)
        if len(outs) != n_results:
            raise self.error(f"{name}: {len(outs)} result types for {n_results} results", head)
        if len(ins) != len(uses) or any((a == SECRET) != (b == SECRET) for a, b in zip(ins, uses)):
            raise self.error(f"{name}: operand types do not match their definitions", head)
        handed = self._handed(returned, len(outs))
        secret_in = SECRET in uses
        derived = [TAINTED if max(uses + [level], default=PUBLIC) > PUBLIC else PUBLIC for level in handed]
        for what, hit in (("reveal operation", any(_REVEAL.search(_unescape(w)) for w in words)),
                          ("secret operand, public result", secret_in and PUBLIC in outs),
                          ("secret operand, public region argument", secret_in and PUBLIC in region_levels),
                          ("secret returned by a region, public result",
                           any(h == SECRET and o == PUBLIC for h, o in zip(handed, outs)))):
            if hit:
                source = " ".join(self.text[start:end[2] + len(end[1])].split())[:300]
                self.found.append(f"{self.where(head)}: {what}: {source}")
        if name.endswith(".call"):
            self.calls.append((head, next((w for w in words if w.startswith("@")), None), uses, outs))
        k = 0
        for tok, count in results:
            self.define(tok, [SECRET if level == SECRET else derived[k + j] for j, level in enumerate(outs[k:k + count])])
            k += count
        return name, uses, head


def _parse(mlir: str) -> _Parser:
    if not isinstance(mlir, str):
        raise IrAuditError(f"expected MLIR text, got {type(mlir).__name__}")
    parser = _Parser(mlir)
    try:
        parser.module()
    except RecursionError:
        raise IrAuditError("regions nested too deeply") from None
    return parser


def declassifications(mlir: str) -> list[str]:
    """Every place where a secret value becomes public, and every public output of @main.

    Raises `IrAuditError` if the IR cannot be parsed and checked (fail closed)."""
    parser = _parse(mlir)
    return parser.found + [text for _, _, text in parser.public_outputs]


def audit(mlir: str, allowed_public_outputs: int = 0) -> None:
    """Raise `IrAuditError` (refuse to run) if the executable declassifies anything or cannot be checked.

    ``allowed_public_outputs``: how many trailing results of @main may be public (default: none)."""
    parser = _parse(mlir)
    found = parser.found + [text for k, n, text in parser.public_outputs if k < n - allowed_public_outputs]
    if found:
        raise IrAuditError("the executable declassifies secret values:\n" + "\n".join(found))
