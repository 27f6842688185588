"""Job commands: job-*, block-job-*, query-jobs, query-block-jobs, blockdev-create.

job-* look jobs up by id ("Job not found"); block-job-* only find block jobs and answer
DeviceNotActive "Block job '%s' not found" (blockdev.c find_block_job_locked). The verbs'
state checks and events are the job's (emulator/jobs/job.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emulator.block.create import NOT_EMULATED
from emulator.commands._unemulated import UNEMULATED_CREATE_BRANCHES
from emulator.jobs.blockjob import BlockJob
from emulator.jobs.create import CREATE_DRIVERS, CreateJob
from emulator.jobs.manager import flushing
from emulator.qmp import schema
from emulator.qmp.errors import GenericError
from emulator.qmp.registry import command

if TYPE_CHECKING:
    from emulator.machine import Machine

schema.enum("PreallocMode", ["off", "metadata", "falloc", "full"])
schema.enum("BlockdevQcow2Version", ["v2", "v3"])
schema.enum("Qcow2CompressionType", ["zlib", "zstd"])
# qapi/crypto.json (QCryptoBlockOptionsQCow is declared with the blockdev-add options)
schema.enum("QCryptoBlockFormat", ["qcow", "luks"])
schema.enum("QCryptoCipherAlgorithm", ["aes-128", "aes-192", "aes-256", "des", "3des",
                                       "cast5-128", "serpent-128", "serpent-192",
                                       "serpent-256", "twofish-128", "twofish-192",
                                       "twofish-256"])
schema.enum("QCryptoCipherMode", ["ecb", "cbc", "xts", "ctr"])
schema.enum("QCryptoIVGenAlgorithm", ["plain", "plain64", "essiv"])
schema.enum("QCryptoHashAlgorithm", ["md5", "sha1", "sha224", "sha256", "sha384", "sha512",
                                     "ripemd160"])
schema.struct("QCryptoBlockCreateOptionsLUKS", {
    "*key-secret": "str", "*cipher-alg": "QCryptoCipherAlgorithm",
    "*cipher-mode": "QCryptoCipherMode", "*ivgen-alg": "QCryptoIVGenAlgorithm",
    "*ivgen-hash-alg": "QCryptoHashAlgorithm", "*hash-alg": "QCryptoHashAlgorithm",
    "*iter-time": "int"})
schema.union("QCryptoBlockCreateOptions", base={"format": "QCryptoBlockFormat"},
             discriminator="format",
             branches={"qcow": "QCryptoBlockOptionsQCow",
                       "luks": "QCryptoBlockCreateOptionsLUKS"})
schema.struct("BlockdevCreateOptionsFile", {
    "filename": "str", "size": "size", "*preallocation": "PreallocMode", "*nocow": "bool",
    "*extent-size-hint": "size"})
schema.struct("BlockdevCreateOptionsQcow2", {
    "file": "BlockdevRef", "*data-file": "BlockdevRef", "*data-file-raw": "bool",
    "*extended-l2": "bool", "size": "size", "*version": "BlockdevQcow2Version",
    "*backing-file": "str", "*backing-fmt": "BlockdevDriver",
    "*encrypt": "QCryptoBlockCreateOptions",
    "*cluster-size": "size", "*preallocation": "PreallocMode", "*lazy-refcounts": "bool",
    "*refcount-bits": "int", "*compression-type": "Qcow2CompressionType"})
schema.union("BlockdevCreateOptions", base={"driver": "BlockdevDriver"},
             discriminator="driver",
             branches={**UNEMULATED_CREATE_BRANCHES, "file": "BlockdevCreateOptionsFile",
                       "qcow2": "BlockdevCreateOptionsQcow2"})


def _block_job(vm: Machine, job_id: str) -> BlockJob:
    job = vm.jobs.find_block_job(job_id)
    assert isinstance(job, BlockJob)
    return job


# -- job-* ------------------------------------------------------------------------------------
@command("job-cancel", data={"id": "str"})
@flushing
def job_cancel(vm: Machine, id: str) -> None:
    vm.jobs.find(id).user_cancel(True)


@command("job-pause", data={"id": "str"})
@flushing
def job_pause(vm: Machine, id: str) -> None:
    vm.jobs.find(id).user_pause()


@command("job-resume", data={"id": "str"})
@flushing
def job_resume(vm: Machine, id: str) -> None:
    vm.jobs.find(id).user_resume()


@command("job-complete", data={"id": "str"})
@flushing
def job_complete(vm: Machine, id: str) -> None:
    vm.jobs.find(id).complete()


@command("job-finalize", data={"id": "str"})
@flushing
def job_finalize(vm: Machine, id: str) -> None:
    job = vm.jobs.find(id)
    job.ref()
    try:
        job.finalize()
    finally:
        job.unref()


@command("job-dismiss", data={"id": "str"})
def job_dismiss(vm: Machine, id: str) -> None:
    vm.jobs.find(id).dismiss()


@command("query-jobs")
def query_jobs(vm: Machine) -> list[dict[str, Any]]:
    return vm.jobs.query_jobs()


# -- block-job-* ----------------------------------------------------------------------------------
@command("block-job-set-speed", data={"device": "str", "speed": "int"})
@flushing
def block_job_set_speed(vm: Machine, device: str, speed: int) -> None:
    _block_job(vm, device).set_speed(speed)


@command("block-job-cancel", data={"device": "str", "*force": "bool"})
@flushing
def block_job_cancel(vm: Machine, device: str, force: bool = False) -> None:
    job = _block_job(vm, device)
    if job.user_paused and not force:
        raise GenericError(f"The block job for device '{device}' is currently paused")
    job.user_cancel(force)


@command("block-job-pause", data={"device": "str"})
@flushing
def block_job_pause(vm: Machine, device: str) -> None:
    _block_job(vm, device).user_pause()


@command("block-job-resume", data={"device": "str"})
@flushing
def block_job_resume(vm: Machine, device: str) -> None:
    _block_job(vm, device).user_resume()


@command("block-job-complete", data={"device": "str"})
@flushing
def block_job_complete(vm: Machine, device: str) -> None:
    _block_job(vm, device).complete()


@command("block-job-finalize", data={"id": "str"})
@flushing
def block_job_finalize(vm: Machine, id: str) -> None:
    job = _block_job(vm, id)
    job.ref()
    try:
        job.finalize()
    finally:
        job.unref()


@command("block-job-dismiss", data={"id": "str"})
def block_job_dismiss(vm: Machine, id: str) -> None:
    _block_job(vm, id).dismiss()


@command("query-block-jobs")
def query_block_jobs(vm: Machine) -> list[dict[str, Any]]:
    return [j.block_info() for j in vm.jobs.block_jobs()
            if isinstance(j, BlockJob) and not j.is_internal]


# -- blockdev-create ------------------------------------------------------------------------------
@command("blockdev-create", data={"job-id": "str", "options": "BlockdevCreateOptions"})
@flushing
def blockdev_create(vm: Machine, job_id: str, options: dict[str, Any]) -> None:
    """qmp_blockdev_create: the driver must support creation; the job starts at once."""
    fmt = options["driver"]
    # every BlockdevDriver exists in Debian's build ("Block driver '%s' not found or not
    # supported" cannot happen); of those with .bdrv_co_create (a BlockdevCreateOptions
    # branch) the emulator creates file and qcow2 only: the others pass QEMU's checks,
    # then are refused
    if fmt not in CREATE_DRIVERS and fmt not in UNEMULATED_CREATE_BRANCHES:
        raise GenericError("Driver does not support blockdev-create")
    vm.jobs.check_new_id(job_id)
    if fmt not in CREATE_DRIVERS:
        raise GenericError(NOT_EMULATED.format(fmt))
    job = CreateJob(vm.jobs, job_id, vm.block, dict(options))
    vm.jobs.register(job, None)
    job.start()
