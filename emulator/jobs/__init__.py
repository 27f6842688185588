"""Jobs (job.c, blockjob.c): the state machine, backup with block-copy, blockdev-create.

A job's body is a generator driven like a QEMU coroutine (:mod:`emulator.jobs.coroutine`):
entered synchronously, it runs until it yields (pause point, sleep, wait for cancel), so the
same QMP command sequence always produces the same events in the same order.
"""
