"""Arithmetic in specs: ``$name`` and ``${expr}`` over the spec's parameters, without ``eval``.

Expressions are numbers, parameter names, ``+ - * / // % **`` and unary minus. The work is
bounded before it is done (:class:`fastserve.limits.Limits`): the source length and the syntax
tree size are checked before evaluation, every number must stay within ``max_int`` in magnitude,
and ``a ** b`` is refused from the sizes of ``a`` and ``b`` alone, before Python computes it (so
``${10 ** 10 ** 10}`` fails at once instead of building a ten-billion-digit integer).
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any

from fastserve.limits import Limits
from fastserve.yamlio import describe


class ExprError(ValueError):
    """An expression cannot be evaluated; the message says why."""


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv, ast.Div: operator.truediv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}


def number_problem(value: Any, limits: Limits) -> str | None:
    """Why ``value`` is not an acceptable number in a spec, or None (also for non-numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number"
    if abs(value) > limits.max_int:
        return (f"{_short(value)} is larger in magnitude than {limits.max_int} "
                f"(Limits.max_int)")
    return None


def evaluate(expr: str, params: dict[str, Any], limits: Limits) -> Any:
    """The value of ``expr`` over ``params``. Raises :class:`ExprError` or ``KeyError`` (an
    undefined parameter, its name as the argument)."""
    if len(expr) > limits.max_expression_chars:
        raise ExprError(f"the expression is {len(expr)} characters long, more than "
                        f"{limits.max_expression_chars} (Limits.max_expression_chars)")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise ExprError(f"invalid syntax ({getattr(e, 'msg', None) or type(e).__name__})") \
            from None
    size = sum(1 for _ in ast.walk(tree))
    if size > limits.max_expression_nodes:
        raise ExprError(f"the expression has {size} terms, more than "
                        f"{limits.max_expression_nodes} (Limits.max_expression_nodes)")

    def ev(n: ast.AST) -> Any:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)) \
                and not isinstance(n.value, bool):
            return _checked(n.value, limits)
        if isinstance(n, ast.Name):
            if n.id not in params:
                raise KeyError(n.id)
            return params[n.id]
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            a, b = _number(ev(n.left)), _number(ev(n.right))
            if isinstance(n.op, ast.Pow):
                _check_power(a, b, limits)
            try:
                value = _BINOPS[type(n.op)](a, b)
            except OverflowError:
                raise ExprError(f"{_short(a)} ** {_short(b)} overflows") from None
            if isinstance(value, complex):
                raise ExprError(f"{_short(a)} ** {_short(b)} is not a real number")
            return _checked(value, limits)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -_number(ev(n.operand))
        raise ExprError(f"unsupported expression element '{ast.dump(n)[:40]}'")

    try:
        value = ev(tree)
    except ZeroDivisionError:
        raise ExprError("division by zero") from None
    if isinstance(value, float) and value.is_integer() and "/" not in expr.replace("//", ""):
        value = int(value)
    return value


def _number(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # a string or list parameter in arithmetic would be repetition, not arithmetic
        raise ExprError(f"arithmetic needs numbers, got {describe(value)}")
    return value


def _check_power(a: int | float, b: int | float, limits: Limits) -> None:
    """Refuse ``a ** b`` whose result would exceed ``max_int``, without computing it."""
    if abs(a) <= 1 or b <= 0:
        return  # the result's magnitude is at most max(|a|, 1)
    if b * math.log2(abs(a)) > math.log2(limits.max_int):
        raise ExprError(f"{_short(a)} ** {_short(b)} would be larger than {limits.max_int} "
                        f"(Limits.max_int)")


def _checked(value: Any, limits: Limits) -> Any:
    problem = number_problem(value, limits)
    if problem:
        raise ExprError(problem)
    return value


def _short(value: Any) -> str:
    """A number or value for a message, never thousands of characters long."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
