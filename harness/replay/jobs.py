"""What the replayer knows about the backend's jobs, learnt from JOB_STATUS_CHANGE events.

Settling ("every job is at rest") and addressing qemu-io at the filter above a drive both
follow from this one model, the same on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Json = Any

# Commands that start a job, and whether QEMU makes that job wait for job-finalize /
# job-dismiss regardless of arguments (blockdev-create: JOB_MANUAL_DISMISS).
JOB_COMMANDS = {"blockdev-backup", "drive-backup", "blockdev-mirror", "drive-mirror",
                "block-stream", "block-commit", "blockdev-create"}
BACKUP_COMMANDS = {"blockdev-backup", "drive-backup"}


@dataclass
class Job:
    id: str
    status: str = "undefined"
    manual_finalize: bool = False
    manual_dismiss: bool = False
    device: str | None = None
    filter_node: str | None = None
    pending_announced: bool = False   # BLOCK_JOB_PENDING seen (QEMU sends it after the
                                      # JOB_STATUS_CHANGE to pending, never before)

    @property
    def resting(self) -> bool:
        """No transition will happen without a command (or, for ``running``, never at rest)."""
        if self.status in ("paused", "ready", "standby", "null"):
            return True
        if self.status == "pending":
            return self.manual_finalize and self.pending_announced
        if self.status == "concluded":
            return self.manual_dismiss
        return False

    @property
    def filter_alive(self) -> bool:
        """backup's copy-before-write filter stays above the device until the job is done."""
        return self.filter_node is not None and self.status not in ("concluded", "null")


class JobTracker:
    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}

    def job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = Job(job_id)
        return job

    def on_event(self, event: Json) -> None:
        data = event.get("data", {})
        if event.get("event") == "JOB_STATUS_CHANGE":
            self.job(str(data.get("id"))).status = str(data.get("status"))
        elif event.get("event") == "BLOCK_JOB_PENDING":
            self.job(str(data.get("id"))).pending_announced = True

    def on_command(self, name: str, arguments: dict[str, Json], reply: Json) -> None:
        """Remember how a job was started (its finalize/dismiss mode, its filter node)."""
        if "return" not in reply:
            return
        if name == "transaction":
            for action in arguments.get("actions", []):
                self.on_command(action.get("type", ""), action.get("data", {}), reply)
            return
        if name not in JOB_COMMANDS:
            return
        job_id = arguments.get("job-id") or arguments.get("device")
        if not isinstance(job_id, str):
            return
        job = self.job(job_id)
        job.manual_finalize = arguments.get("auto-finalize") is False
        job.manual_dismiss = name == "blockdev-create" or arguments.get("auto-dismiss") is False
        if name in BACKUP_COMMANDS:
            job.device = arguments.get("device")
            job.filter_node = arguments.get("filter-node-name")

    def busy(self) -> list[Job]:
        return [j for j in self.jobs.values() if not j.resting]

    def top_node(self, device: str) -> str:
        """The node a write to ``device`` should go through: the newest live filter above it."""
        for job in reversed(list(self.jobs.values())):
            if job.device == device and job.filter_alive and job.filter_node:
                return job.filter_node
        return device
