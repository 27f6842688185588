"""The emulator's QMP layer: QEMU 7.2's monitor, wire-exact.

- errors: QMPError and the error classes handlers raise
- json_lexer, json_streamer, json_parser, utf8: QEMU's JSON input, quirks and texts included
- json_writer: QEMU's JSON output (QDict key order, escapes, %.17g)
- ghash, visitor, schema: QAPI types and argument checking with QEMU's texts and order
- registry: ``@command``; dispatch: one request to one response; hmp: human-monitor-command
- protocol: the sans-I/O session; server: UNIX sockets and in-process socket pairs
- qemu_probe, introspect, qemu_commands: asking the real binary, comparing with it
"""
