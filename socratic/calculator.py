"""A safe calculator for GSM8K-style annotations such as ``48/2 = <<48/2=24>>24``.

Why: small students learn to *set up* arithmetic far more easily than to *do* it; a 100M-1B
parameter model that writes ``48/2`` will happily continue with ``=25``. Following the GSM8K
set-up used by the Socratic distillation paper, the model writes the expression and this module
supplies the result. It does so inside decoding (``socratic.generate.CalculatorForcing`` calls
``evaluate`` the moment a row has written ``<<EXPR=`` and forces the result), so the model
continues from the right value. ``apply_calculator`` is the after-the-fact fallback for text
that bypassed decoding: it recomputes every ``<<EXPR=...>>`` span and overwrites the number the
model copied after it.

Accepted grammar (anything else raises ``CalculatorError`` naming what was found)::

    expr    := expr ("+" | "-" | "*" | "/") expr | ("+" | "-") expr | "(" expr ")" | literal
    literal := digits | digits "." digits | "." digits | digits "."

Arithmetic is exact (``fractions.Fraction``, with decimal literals read from their source text),
so ``0.1+0.2`` is exactly ``3/10`` and results never carry float noise into the text.

Why an AST walk and not ``eval``: the expressions are written by a model, i.e. untrusted input.
``eval`` would run ``__import__('os')``, and even "pure" arithmetic such as ``9**9**9`` can hang
the process. Walking the tree of ``ast.parse(expr, mode="eval")`` with an allow-list means only
the nodes above are ever evaluated.

Abuse limits: expressions longer than ``MAX_EXPRESSION_CHARS`` (256) are refused, and so is any
literal, intermediate or final value whose numerator or denominator exceeds ``MAX_MAGNITUDE``
(10**30 in absolute value). GSM8K values stay below 10**10, so this bound only ever stops
degenerate input, while keeping each operation cheap (a 256-character product of huge literals
would otherwise build arbitrarily large integers).

Results are written by ``format_number``: exact when the decimal terminates ("12.5", "0.75"),
otherwise rounded to 6 decimal places with trailing zeros removed (1/3 -> "0.333333"). Rounding
is fine here because the text is a step inside a solution, not a stored gold answer.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from fractions import Fraction

from socratic.answers import format_answer

__all__ = [
    "MAX_EXPRESSION_CHARS",
    "MAX_MAGNITUDE",
    "CalculatorError",
    "CalculatorResult",
    "apply_calculator",
    "evaluate",
    "format_number",
]

MAX_EXPRESSION_CHARS = 256
MAX_MAGNITUDE = 10**30
ROUND_DECIMALS = 6

_ALLOWED = "only numbers, + - * /, and parentheses are allowed"

# Plain decimal literals only: no exponents (1e999), underscores, hex/octal/binary or imaginary.
_LITERAL_RE = re.compile(r"\d+\.?\d*|\.\d+")

# <<EXPR=CLAIMED>> or <<EXPR>>; spans never nest.
_SPAN_RE = re.compile(r"<<([^<>]*)>>")

# The model's copy of the result right after ">>": optional '-', digits (possibly grouped by
# thousands, so "1,200" is replaced whole), optional decimal part (a bare final '.' is a period).
_COPY_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")

_BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

_FORBIDDEN_OPS = {
    ast.Pow: "exponentiation (**)",
    ast.Mod: "modulo (%)",
    ast.FloorDiv: "floor division (//)",
    ast.MatMult: "matrix multiplication (@)",
    ast.LShift: "bit shift (<<)",
    ast.RShift: "bit shift (>>)",
    ast.BitOr: "bitwise or (|)",
    ast.BitAnd: "bitwise and (&)",
    ast.BitXor: "bitwise xor (^)",
    ast.Invert: "bitwise not (~)",
    ast.Not: "'not'",
}

_FORBIDDEN_NODES = {
    ast.Name: "name",
    ast.Call: "function call",
    ast.Attribute: "attribute access",
    ast.Subscript: "subscript",
    ast.Compare: "comparison",
    ast.BoolOp: "boolean operator (and/or)",
    ast.Tuple: "tuple",
    ast.List: "list",
    ast.Dict: "dict",
    ast.Set: "set",
    ast.Lambda: "lambda",
    ast.IfExp: "conditional expression",
    ast.JoinedStr: "f-string",
    ast.NamedExpr: "assignment expression (:=)",
}


class CalculatorError(ValueError):
    """An annotation the calculator refuses; the message names the expression and the reason."""


@dataclass(frozen=True)
class CalculatorResult:
    """The rewritten text, how many spans were computed, and why the others were left alone."""

    text: str
    evaluated: int
    errors: list[str]


def _fail(expr: str, reason: str) -> CalculatorError:
    return CalculatorError(f"cannot evaluate {expr!r}: {reason}")


def _forbidden(expr: str, what: str) -> CalculatorError:
    return _fail(expr, f"{what} is not allowed; {_ALLOWED}")


def _checked(expr: str, value: Fraction) -> Fraction:
    if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
        raise _fail(expr, "a value's numerator or denominator exceeds 10**30 in magnitude")
    return value


def _describe(node: ast.AST, source: str) -> str:
    segment = ast.get_source_segment(source, node)
    kind = _FORBIDDEN_NODES.get(type(node), f"syntax {type(node).__name__}")
    if isinstance(node, ast.Name):
        return f"name {node.id!r}"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return f"function call {node.func.id}(...)"
    return f"{kind} {segment!r}" if segment else kind


def _literal(node: ast.Constant, source: str, expr: str) -> Fraction:
    value = node.value
    if isinstance(value, bool) or value is None or value is Ellipsis:
        raise _forbidden(expr, f"constant {value!r}")
    if isinstance(value, (str, bytes)):
        raise _forbidden(expr, f"string literal {value!r}")
    text = ast.get_source_segment(source, node)
    if not isinstance(value, (int, float)) or text is None or not _LITERAL_RE.fullmatch(text):
        raise _fail(
            expr,
            f"number literal {text or value!r} is not allowed; write plain decimals such as "
            "12, 0.5 or .5 (no exponents, underscores, other bases or imaginary numbers)",
        )
    return _checked(expr, Fraction(text))


def _walk(node: ast.AST, source: str, expr: str) -> Fraction:
    if isinstance(node, ast.Constant):
        return _literal(node, source, expr)
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.USub):
            return -_walk(node.operand, source, expr)
        if isinstance(node.op, ast.UAdd):
            return _walk(node.operand, source, expr)
        raise _forbidden(expr, _FORBIDDEN_OPS.get(type(node.op), type(node.op).__name__))
    if isinstance(node, ast.BinOp):
        op = type(node.op)
        if op not in _BINARY_OPS and op is not ast.Div:
            raise _forbidden(expr, _FORBIDDEN_OPS.get(op, op.__name__))
        left = _walk(node.left, source, expr)
        right = _walk(node.right, source, expr)
        if op is ast.Div:
            if right == 0:
                raise _fail(expr, "division by zero")
            return _checked(expr, left / right)
        return _checked(expr, _BINARY_OPS[op](left, right))
    raise _forbidden(expr, _describe(node, source))


def evaluate(expr: str) -> Fraction:
    """Compute an arithmetic annotation exactly, refusing anything outside the tiny grammar.

    Raises CalculatorError (a ValueError) with a message naming the expression and the reason.
    """
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise _fail(
            expr[:40] + "...",
            f"expression is {len(expr)} characters long; the limit is {MAX_EXPRESSION_CHARS}",
        )
    source = expr.strip()
    if "," in source:
        # ast would read "1,000+1" as the tuple (1, 0+1): refuse before it can mislead.
        raise _fail(expr, "commas are not allowed (write 1000, not 1,000: no thousands separators)")
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise _fail(expr, f"not a valid arithmetic expression ({exc.msg}); {_ALLOWED}") from None
    except (ValueError, MemoryError, RecursionError) as exc:
        raise _fail(expr, f"not a valid arithmetic expression ({exc})") from None
    return _walk(tree.body, source, expr)


def format_number(x: Fraction) -> str:
    """Write a calculator result the way a solution should show it.

    Exact for integers and terminating decimals ("24", "-3", "12.5"); anything else is rounded
    to 6 decimal places with trailing zeros stripped (1/3 -> "0.333333", 2/3 -> "0.666667").
    Ties cannot occur when rounding a non-terminating value, so the rounding mode is moot.
    """
    x = Fraction(x)
    text = format_answer(x)
    if "/" not in text:
        return text
    return format_answer(round(x, ROUND_DECIMALS))


def apply_calculator(text: str) -> CalculatorResult:
    """Recompute every ``<<EXPR=CLAIMED>>`` (or ``<<EXPR>>``) span and fix the copy after it.

    A good span becomes ``<<EXPR=VALUE>>`` and a number directly after ``>>`` is replaced by
    VALUE, so "48/2 = <<48/2=25>>25" turns into "48/2 = <<48/2=24>>24". A span that fails to
    evaluate is left exactly as written and its error message is collected instead.
    """
    out: list[str] = []
    errors: list[str] = []
    evaluated = 0
    pos = 0
    for match in _SPAN_RE.finditer(text):
        out.append(text[pos : match.start()])
        pos = match.end()
        expr = match[1].partition("=")[0]
        try:
            value = format_number(evaluate(expr))
        except CalculatorError as exc:
            errors.append(str(exc))
            out.append(match[0])
            continue
        evaluated += 1
        out.append(f"<<{expr}={value}>>")
        copy = _COPY_RE.match(text, pos)
        if copy is not None:
            out.append(value)
            pos = copy.end()
    out.append(text[pos:])
    return CalculatorResult(text="".join(out), evaluated=evaluated, errors=errors)
