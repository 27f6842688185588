"""Reports of conformance runs: the terminal matrix, the HTML page, the progress line."""

from harness.report.html import render_html
from harness.report.terminal import render_terminal

__all__ = ["render_html", "render_terminal"]
