"""The generic job (job.c): state machine, verbs, transactions, JOB_STATUS_CHANGE.

A job's body (:meth:`Job.run`) is a generator standing for QEMU's job coroutine: it is
entered synchronously (:meth:`Job.enter`, like aio_co_wake from the main loop) and runs until
it yields at a pause point, a sleep or a wait for cancellation. Completion runs in a bottom
half (``job_exit``) scheduled on the event loop, as QEMU's aio_bh_schedule_oneshot. The
functions keep QEMU's names and order, because the order of JOB_STATUS_CHANGE and BLOCK_JOB_*
events follows from them (docs/qemu-semantics.md §5).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, ClassVar

from emulator.block import waits
from emulator.jobs.progress import ProgressMeter
from emulator.qmp.errors import GenericError

if TYPE_CHECKING:
    from emulator.jobs.manager import JobManager

log = logging.getLogger(__name__)

# a job coroutine: yields None to give up the CPU, returns a value (run: 0 or -errno)
Co = Generator[None, None, Any]

# job_state_transition's table (JobSTT): from -> allowed targets
STT: dict[str, frozenset[str]] = {
    "undefined": frozenset({"created"}),
    "created": frozenset({"running", "aborting", "null"}),
    "running": frozenset({"paused", "ready", "waiting", "aborting"}),
    "paused": frozenset({"running"}),
    "ready": frozenset({"standby", "waiting", "aborting"}),
    "standby": frozenset({"ready"}),
    "waiting": frozenset({"pending", "aborting"}),
    "pending": frozenset({"aborting", "concluded"}),
    "aborting": frozenset({"aborting", "concluded"}),
    "concluded": frozenset({"null"}),
    "null": frozenset(),
}
_ACTIVE = frozenset({"created", "running", "paused", "ready", "standby"})
# JobVerbTable: verb -> states that accept it
VERBS: dict[str, frozenset[str]] = {
    "cancel": _ACTIVE | {"waiting", "pending"},
    "pause": _ACTIVE,
    "resume": _ACTIVE,
    "set-speed": _ACTIVE,
    "complete": frozenset({"ready", "standby"}),
    "finalize": frozenset({"pending"}),
    "dismiss": frozenset({"concluded"}),
}
COMPLETED = frozenset({"waiting", "pending", "aborting", "concluded", "null"})


def strerror(ret: int) -> str:
    """strerror(-ret) as glibc words it ("Input/output error", "Operation canceled")."""
    return os.strerror(-ret)


class JobTxn:
    """struct JobTxn: jobs that complete or fail together (newest first)."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.aborting = False

    def add(self, job: Job) -> None:
        """job_txn_add_job_locked (QLIST_INSERT_HEAD)."""
        assert job.txn is None
        job.txn = self
        self.jobs.insert(0, job)

    def remove(self, job: Job) -> None:
        """job_txn_del_job_locked."""
        if job in self.jobs:
            self.jobs.remove(job)
        job.txn = None

    def apply(self, job: Job, fn: Callable[[Job], int]) -> int:
        """job_txn_apply_locked: ``fn`` on every job until one returns non-zero."""
        rc = 0
        job.ref()
        for other in list(self.jobs):
            rc = fn(other)
            if rc:
                break
        job.unref()
        return rc


class Job:
    """struct Job plus the JobDriver hooks (override run, commit, abort, clean...)."""

    job_type: ClassVar[str] = ""

    def __init__(self, manager: JobManager, job_id: str | None, *,
                 manual_finalize: bool = False, manual_dismiss: bool = False) -> None:
        self.manager = manager
        self.id = job_id
        self.status = "undefined"
        self.ret = 0
        self.err: str | None = None
        self.refcnt = 1
        self.busy = False
        self.paused = True
        self.pause_count = 1
        self.user_paused = False
        self.cancelled = False
        self.force_cancel = False
        self.deferred_to_main_loop = False
        self.auto_finalize = not manual_finalize
        self.auto_dismiss = not manual_dismiss
        self.txn: JobTxn | None = None
        self.progress = ProgressMeter()
        self.started = False            # job->co != NULL
        self._co: Co | None = None
        self._timer: Any = None         # the sleep timer (job->sleep_timer)
        self._scheduled: Any = None     # the pending job_exit bottom half
        self._io_token: object | None = None
        self._io_started = False   # a thread wait let the entering command reply

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r} {self.status}>"

    # -- driver hooks (JobDriver) -------------------------------------------------------------
    def run(self) -> Co:
        """.run: the job's work; returns 0 or -errno (self.err may hold the message)."""
        raise NotImplementedError
        yield  # pragma: no cover

    def prepare(self) -> int:
        return 0

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def clean(self) -> None:
        pass

    def driver_pause(self) -> Co:
        """.pause, called at a pause point before the job pauses."""
        return
        yield  # pragma: no cover

    def driver_resume(self) -> None:
        pass

    def driver_user_resume(self) -> None:
        pass

    def resumed_from_pause(self) -> None:
        """The coroutine was re-entered after a pause (job-resume, a drain's end): its next
        wait lets the resuming command reply before the job goes on (wait_for_io)."""
        self._io_started = False

    def driver_cancel(self, force: bool) -> bool:
        """.cancel: returns the effective force (no .cancel means force)."""
        return True

    has_complete: ClassVar[bool] = False

    def driver_complete(self) -> None:
        pass

    def free(self) -> None:
        """.free, when the last reference goes."""

    # notifiers (blockjob.c turns them into BLOCK_JOB_* events)
    def event_cancelled(self) -> None:
        pass

    def event_completed(self) -> None:
        pass

    def event_pending(self) -> None:
        pass

    def event_ready(self) -> None:
        pass

    def event_idle(self) -> None:
        pass

    # -- state ----------------------------------------------------------------------------------
    @property
    def is_internal(self) -> bool:
        return self.id is None

    def transition(self, s1: str) -> None:
        """job_state_transition_locked: JOB_STATUS_CHANGE for jobs with an id."""
        s0 = self.status
        assert s1 in STT[s0], f"job {self.id}: {s0} -> {s1} is not allowed"
        self.status = s1
        if not self.is_internal and s1 != s0:
            self.manager.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": s1})

    def apply_verb(self, verb: str) -> None:
        """job_apply_verb_locked."""
        if self.status not in VERBS[verb]:
            raise GenericError(f"Job '{self.id}' in state '{self.status}' cannot accept "
                               f"command verb '{verb}'")

    def is_cancelled(self) -> bool:
        """job_is_cancelled: only a forced cancel stops a job's work."""
        return self.force_cancel

    def cancel_requested(self) -> bool:
        return self.cancelled

    def is_ready(self) -> bool:
        return self.status in ("ready", "standby")

    def is_completed(self) -> bool:
        return self.status in COMPLETED

    def should_pause(self) -> bool:
        return self.pause_count > 0

    def ref(self) -> None:
        self.refcnt += 1

    def unref(self) -> None:
        """job_unref_locked: the last reference frees the job and forgets it."""
        self.refcnt -= 1
        if self.refcnt == 0:
            assert self.status == "null"
            self._cancel_timer()
            self.free()
            self.manager.forget(self)

    # -- the coroutine ----------------------------------------------------------------------
    def _co_entry(self) -> Co:
        """job_co_entry; the wait of the run's last requests comes before job_exit is
        scheduled (a bottom half after a bottom-half wait runs after the reply)."""
        yield from self.pause_point()
        ret = yield from self.run()
        yield from self.wait_for_io()
        return ret

    def _step(self) -> None:
        """Enter the coroutine until it yields; when run returns, defer job_exit. The waits
        its I/O notes are its own: whoever entered it gets theirs back afterwards."""
        assert self._co is not None
        outer = waits.take()
        try:
            self._co.send(None)
        except StopIteration as stop:
            self._finished(int(stop.value or 0))
        except Exception as exc:   # a bug of the emulator's: the job fails, nothing hangs
            log.exception("job %s failed inside the emulator", self.id)
            self.err = f"internal error in the emulator's {self.job_type} job: {exc!r}"
            self._finished(-errno.EIO)
        finally:
            waits.take(outer)

    def _finished(self, ret: int) -> None:
        """The coroutine has returned ``ret``: job_exit runs from the main loop."""
        self._co = None
        self.ret = ret
        self.deferred_to_main_loop = True
        self.busy = True
        self._scheduled = self.manager.bh(self._exit)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def timer_pending(self) -> bool:
        return self._timer is not None

    def _timer_cb(self) -> None:
        """job_sleep_timer_cb."""
        self._timer = None
        self.enter()

    def do_yield(self, ns: int | None = None) -> Co:
        """job_do_yield_locked: yield, optionally re-entered by a timer after ``ns``."""
        if ns is not None:
            self._timer = self.manager.call_later(ns / 1e9, self._timer_cb)
        self.busy = False
        self.event_idle()
        yield
        assert self.busy

    def enter_cond(self, fn: Callable[[], bool] | None = None) -> None:
        """job_enter_cond_locked: wake the coroutine now if it is idle."""
        if not self.started or self.deferred_to_main_loop or self.busy:
            return
        if self._co is None:
            return
        if fn is not None and not fn():
            return
        self._cancel_timer()
        self.busy = True
        self._step()

    def enter(self) -> None:
        self.enter_cond(None)

    def pause_point(self) -> Co:
        """job_pause_point_locked."""
        if not self.should_pause() or self.is_cancelled():
            return
        yield from self.driver_pause()
        if self.should_pause() and not self.is_cancelled():
            status = self.status
            self.transition("standby" if status == "ready" else "paused")
            self.paused = True
            yield from self.do_yield()
            self.paused = False
            self.transition(status)
            self.resumed_from_pause()
        self.driver_resume()

    def job_yield(self) -> Co:
        """job_yield: wait until entered (cancel, pause, a callback)."""
        assert self.busy
        if self.is_cancelled():
            return
        if not self.should_pause():
            yield from self.do_yield()
        yield from self.pause_point()

    def sleep_ns(self, ns: int) -> Co:
        """job_sleep_ns."""
        assert self.busy
        if self.is_cancelled():
            return
        if not self.should_pause():
            yield from self.do_yield(ns)
        yield from self.pause_point()

    # -- pause / resume -------------------------------------------------------------------------
    def pause(self) -> None:
        """job_pause_locked."""
        self.pause_count += 1
        if not self.paused:
            self.enter_cond()

    def resume(self) -> None:
        """job_resume_locked: kick only if no timer is pending."""
        assert self.pause_count > 0
        self.pause_count -= 1
        if self.pause_count:
            return
        self.enter_cond(lambda: not self.timer_pending())

    def user_pause(self) -> None:
        """job_user_pause_locked."""
        self.apply_verb("pause")
        if self.user_paused:
            raise GenericError("Job is already paused")
        self.user_paused = True
        self.pause()

    def user_resume(self) -> None:
        """job_user_resume_locked: the "not paused" check comes before the verb check."""
        if not self.user_paused or self.pause_count <= 0:
            raise GenericError("Can't resume a job that was not paused")
        self.apply_verb("resume")
        self.driver_user_resume()
        self.user_paused = False
        self.resume()

    # -- start, end -----------------------------------------------------------------------------
    def start(self) -> None:
        """job_start: RUNNING, and the coroutine runs at once until it first yields (a
        pause point, or the first I/O that QEMU would hand to a thread: see io_yield)."""
        assert not self.started and self.paused
        self._co = self._co_entry()
        self.started = True
        self.pause_count -= 1
        self.busy = True
        self.paused = False
        self.transition("running")
        self._step()

    def io_yield(self, bottom_half: bool = False) -> Co:
        """Yield as a coroutine does on I/O that completes in another thread (file-posix's
        thread pool): the job goes on from the event loop, after the current command's
        reply; or, with ``bottom_half``, as one that aio_co_schedule re-enters (blkdebug
        before it fails a request): from a bottom half, which runs before that reply unless
        the job already runs in one. A pause or cancel that enters the job meanwhile just
        continues it."""
        token = object()
        self._io_token = token

        def complete() -> None:
            if self._io_token is token:
                self._io_token = None
                self.enter()

        (self.manager.bh if bottom_half else self.manager.call_soon)(complete)
        yield from self.do_yield()
        self._io_token = None

    def wait_for_io(self) -> Co:
        """The wait QEMU's coroutine had in the I/O done since the last yield point (see
        emulator.block.waits): a request sent to a thread lets the command that entered the
        job reply first; one that blkdebug failed first only yields to a bottom half. After
        a thread wait the rest runs from the event loop, and later waits change nothing
        until a command enters the job again (the note stays: zero_run may defer writes)."""
        if self._io_started:
            return
        wait = waits.take()
        if wait is None:
            return
        self._io_started = wait == waits.THREAD
        yield from self.io_yield(bottom_half=wait == waits.BH)

    def _exit(self) -> None:
        """job_exit (a bottom half)."""
        self._scheduled = None
        self.ref()
        self.busy = False
        self.event_idle()
        self._completed()
        self.unref()

    def do_dismiss(self) -> None:
        """job_do_dismiss_locked."""
        self.busy = False
        self.paused = False
        self.deferred_to_main_loop = True
        if self.txn is not None:
            self.txn.remove(self)
        self.transition("null")
        self.unref()

    def early_fail(self) -> None:
        """job_early_fail: a job that could not be set up goes from created to null."""
        assert self.status == "created"
        self.do_dismiss()

    def _conclude(self) -> None:
        self.transition("concluded")
        if self.auto_dismiss or not self.started:
            self.do_dismiss()

    def update_rc(self) -> None:
        """job_update_rc_locked."""
        if not self.ret and self.is_cancelled():
            self.ret = -errno.ECANCELED
        if self.ret:
            if self.err is None:
                self.err = strerror(self.ret)
            self.transition("aborting")

    def finalize_single(self) -> int:
        """job_finalize_single_locked: commit or abort, clean, BLOCK_JOB_*, conclude."""
        assert self.is_completed()
        self.update_rc()
        if not self.ret:
            self.commit()
        else:
            self.abort()
        self.clean()
        if self.started:
            if self.is_cancelled():
                self.event_cancelled()
            else:
                self.event_completed()
        if self.txn is not None:
            self.txn.remove(self)
        self._conclude()
        return 0

    def cancel_async(self, force: bool) -> None:
        """job_cancel_async_locked."""
        force = self.driver_cancel(force)
        if self.user_paused:
            self.driver_user_resume()
            self.user_paused = False
            assert self.pause_count > 0
            self.pause_count -= 1
        if force or not self.deferred_to_main_loop:
            self.cancelled = True
            self.force_cancel |= force

    def _txn_abort(self) -> None:
        """job_completed_txn_abort_locked."""
        txn = self.txn
        assert txn is not None
        if txn.aborting:
            return
        txn.aborting = True
        self.ref()
        for other in list(txn.jobs):
            if other is not self:
                other.cancel_async(True)
        while txn.jobs:
            other = txn.jobs[0]
            if not other.is_completed():
                assert other.cancel_requested()
                other.finish_sync(None)
            other.finalize_single()
        self.unref()

    def _prepare(self) -> int:
        """job_prepare_locked."""
        if self.ret == 0:
            self.ret = self.prepare()
            self.update_rc()
        return self.ret

    def _do_finalize(self) -> None:
        """job_do_finalize_locked."""
        assert self.txn is not None
        if self.txn.apply(self, Job._prepare):
            self._txn_abort()
        else:
            self.txn.apply(self, Job.finalize_single)

    def _transition_to_pending(self) -> int:
        self.transition("pending")
        if not self.auto_finalize:
            self.event_pending()
        return 0

    def transition_to_ready(self) -> None:
        """job_transition_to_ready."""
        self.transition("ready")
        self.event_ready()

    def _completed_txn_success(self) -> None:
        """job_completed_txn_success_locked."""
        txn = self.txn
        assert txn is not None
        self.transition("waiting")
        for other in txn.jobs:
            if not other.is_completed():
                return
            assert other.ret == 0
        txn.apply(self, Job._transition_to_pending)
        if txn.apply(self, lambda j: int(not j.auto_finalize)) == 0:
            self._do_finalize()

    def _completed(self) -> None:
        """job_completed_locked."""
        assert self.txn is not None and not self.is_completed()
        self.update_rc()
        if self.ret:
            self._txn_abort()
        else:
            self._completed_txn_success()

    # -- verbs of the QMP commands -------------------------------------------------------------
    def cancel(self, force: bool) -> None:
        """job_cancel_locked."""
        if self.status == "concluded":
            self.do_dismiss()
            return
        self.cancel_async(force)
        if not self.started:
            self._completed()
        elif self.deferred_to_main_loop:
            if self.is_cancelled():
                self._txn_abort()
        else:
            self.enter_cond()

    def user_cancel(self, force: bool) -> None:
        """job_user_cancel_locked."""
        self.apply_verb("cancel")
        self.cancel(force)

    def complete(self) -> None:
        """job_complete_locked."""
        self.apply_verb("complete")
        if self.cancel_requested() or not self.has_complete:
            raise GenericError(f"The active block job '{self.id}' cannot be completed")
        self.driver_complete()

    def finalize(self) -> None:
        """job_finalize_locked."""
        self.apply_verb("finalize")
        self._do_finalize()

    def dismiss(self) -> None:
        """job_dismiss_locked."""
        self.apply_verb("dismiss")
        self.do_dismiss()

    def finish_sync(self, finish: Callable[[], None] | None) -> int:
        """job_finish_sync_locked: apply ``finish`` and run the job until it completes."""
        self.ref()
        try:
            if finish is not None:
                finish()
            self.wait_while(lambda: not self.is_completed())
        finally:
            self.unref()
        return -errno.ECANCELED if self.is_cancelled() and self.ret == 0 else self.ret

    def cancel_sync(self, force: bool) -> int:
        """job_cancel_sync_locked."""
        return self.finish_sync(lambda: self.cancel(force))

    def wait_while(self, cond: Callable[[], bool], rounds: int = 100_000) -> None:
        """AIO_WAIT_WHILE(cond) for this job: poll it until cond is false (bounded, so an
        emulator bug cannot hang the monitor)."""
        for _ in range(rounds):
            if not cond():
                return
            self.poll()

    def poll(self) -> None:
        """One round of AIO_WAIT_WHILE for this job: run what is scheduled, else enter."""
        handle, self._scheduled = self._scheduled, None
        if handle is not None:
            handle.run_now()
            return
        if self._timer is not None:
            self._timer_cb_now()
            return
        self.enter()

    def _timer_cb_now(self) -> None:
        self._cancel_timer()
        self.enter()

    # -- queries --------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """JobInfo (job_query_single_locked), members in QAPI order."""
        out: dict[str, Any] = {"id": self.id, "type": self.job_type, "status": self.status,
                               "current-progress": self.progress.current,
                               "total-progress": self.progress.total}
        if self.err is not None:
            out["error"] = self.err
        return out
