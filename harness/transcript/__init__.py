"""The transcript language: iotests-style goldens as typed, line-numbered records."""

from harness.transcript.parser import parse, parse_file
from harness.transcript.render import render, render_records
from harness.transcript.transcript import Part, Transcript

__all__ = ["Part", "Transcript", "parse", "parse_file", "render", "render_records"]
