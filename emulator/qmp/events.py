"""The QMP events the emulator emits, by QEMU's names.

``qmpreplay commands --against`` reports them beside a real binary's events; a test keeps
this list in step with every ``emit("…")`` in the emulator's code.
"""

EMITTED = frozenset({
    "BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR", "BLOCK_JOB_PENDING",
    "BLOCK_JOB_READY", "JOB_STATUS_CHANGE", "RESUME", "SHUTDOWN", "STOP",
})
