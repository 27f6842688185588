"""jinja2 for recipe values and probes: one strict environment, templates compiled once.

jinja2 is imported on first use, so cases without templates never pay for it; nor do those
whose templates are all a lone ``{{ expression }}`` over string literals and variables with
``==``, ``!=``, ``and``, ``or``, ``not`` and ``… if … else …`` (such as 257's ``rebase``):
there jinja2 and Python mean the same, so Python evaluates them (importing jinja2 costs a
run more than all its sections' templates).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import re
from typing import Any

_LONE_EXPRESSION = re.compile(r"\{\{\s*([^{}|~%#\\\n]*?)\s*\}\}")
_PLAIN_NODES = (ast.Name, ast.Load, ast.Compare, ast.Eq, ast.NotEq, ast.BoolOp, ast.And,
                ast.Or, ast.UnaryOp, ast.Not, ast.IfExp)
_JINJA_CONSTANTS = frozenset({"true", "false", "none"})   # names in Python, literals in jinja2


class TemplateError(Exception):
    """A template or expression that does not compile or render (jinja2's message)."""


@functools.cache
def _environment() -> Any:
    import jinja2
    return jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)


@functools.lru_cache(maxsize=512)
def _template(text: str) -> Any:
    return _environment().from_string(text)


@functools.lru_cache(maxsize=512)
def _expression(text: str) -> Any:
    return _environment().compile_expression(text, undefined_to_none=False)


@functools.lru_cache(maxsize=512)
def _plain(text: str) -> tuple[ast.expr, frozenset[str]] | None:
    """The expression of a template jinja2 and Python read alike, and the names in it."""
    m = _LONE_EXPRESSION.fullmatch(text)
    if m is None:
        return None
    source = m.group(1)
    try:
        tree = ast.parse(source, mode="eval").body
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            segment = ast.get_source_segment(source, node) or ""
            if not (isinstance(node.value, str) and segment[:1] in ("'", '"')):
                return None   # numbers, True, r'…', b'…': jinja2's own literals
        elif not isinstance(node, _PLAIN_NODES) or (
                isinstance(node, ast.Compare) and len(node.ops) > 1):
            return None
    names = frozenset(n.id for n in ast.walk(tree) if isinstance(n, ast.Name))
    return (tree, names) if not names & _JINJA_CONSTANTS else None


def _value(node: ast.expr, variables: dict[str, Any]) -> Any:
    """Evaluate a ``_plain`` expression as jinja2 would (Python semantics throughout)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return variables[node.id]
    if isinstance(node, ast.UnaryOp):
        return not _value(node.operand, variables)
    if isinstance(node, ast.IfExp):
        return _value(node.body if _value(node.test, variables) else node.orelse, variables)
    if isinstance(node, ast.Compare):
        left, right = _value(node.left, variables), _value(node.comparators[0], variables)
        return left == right if isinstance(node.ops[0], ast.Eq) else left != right
    assert isinstance(node, ast.BoolOp)
    for operand in node.values[:-1]:   # the first truthy (or) / falsy (and) operand, or the last
        value = _value(operand, variables)
        if bool(value) == isinstance(node.op, ast.Or):
            return value
    return _value(node.values[-1], variables)


def render(text: str, **variables: Any) -> str:
    plain = _plain(text)
    if plain is not None and plain[1] <= variables.keys():   # else jinja2 says what is wrong
        return str(_value(plain[0], variables))
    import jinja2
    try:
        return str(_template(text).render(**variables))
    except jinja2.TemplateError as exc:
        raise TemplateError(str(exc)) from None


def evaluate(expression: str, **variables: Any) -> Any:
    """The value of a jinja2 expression; an undefined name or item is an error, not None."""
    import jinja2
    try:
        found = _expression(expression)(**variables)
        if isinstance(found, jinja2.Undefined):
            found._fail_with_undefined_error()
        return found
    except jinja2.TemplateError as exc:
        raise TemplateError(str(exc)) from None


def warm(texts: list[str], expressions: list[str]) -> None:
    """Compile these templates and expressions now (errors surface when they are used)."""
    with contextlib.suppress(Exception):
        for text in texts:
            if _plain(text) is None:
                _template(text)
        for expression in expressions:
            _expression(expression)
