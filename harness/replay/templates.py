"""jinja2 for recipe values and probes: one strict environment, templates compiled once.

jinja2 is imported on first use, so cases without templates never pay for it.
"""

from __future__ import annotations

import functools
from typing import Any


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


def render(text: str, **variables: Any) -> str:
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



def preload() -> None:
    """Import jinja2 and make the environment now: forked workers then inherit them rather
    than each importing jinja2 for the first template it renders."""
    _environment()
