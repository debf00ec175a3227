"""The input is scanned once, by rank 0, and published to the other ranks with the job's run id.

Rank 0 takes the run dir's lock (one job per dir), reads the input and writes scan.json (whole, and
only once the scan and its checks are done); the other ranks wait for it, then load it and hold
their share of the lock. With a process group (torchrun, or MASTER_ADDR/MASTER_PORT set under srun)
rank 0's outcome is broadcast; without one (plain srun) rank 0 publishes it in the run dir's ready
marker tagged with this job's id (the Slurm job/step/restart), so a stale scan or marker of an
earlier run is never taken for this one, and rank 0's errors reach every rank instead of leaving
them waiting.
"""
import hashlib
import logging
import time
from datetime import datetime, timedelta, timezone

import torch

from speakerlab import data as data_mod
from speakerlab import manifest as manifest_mod
from speakerlab.extract.options import ExtractOptions, UsageError
from speakerlab.extract.runtime import group_env, job_id, rank_info
from speakerlab.rundir import RunDir, RunDirBusy, RunDirError, new_run_id, rank_dir_name

log = logging.getLogger("speakerlab")


def scan_on_rank0(options: ExtractOptions, source: dict, run_dir: RunDir, world: int) -> data_mod.ScanResult:
    ranks = run_dir.ranks()
    if run_dir.has_scan() and not options.overwrite:
        scan = run_dir.load_scan()
        change = manifest_mod.source_changed(scan.source, source)
        if change:
            raise UsageError(f"{run_dir} cannot be resumed: {change}; use another --output_dir or --overwrite")
        if source["type"] == "tree":  # manifests and Kaldi dirs are checked by their hash above
            check_tree_unchanged(scan, source, run_dir)
        log.info("reusing %s (%d utterances)", run_dir.scan_path, len(scan.utterances))
        fresh = False
    else:
        if ranks and not options.overwrite:  # results without the scan they were made from
            raise UsageError(f"{run_dir} holds rank results ({', '.join(map(rank_dir_name, ranks))}) but no "
                             f"{run_dir.scan_path.name} to tell what they were made from; use --overwrite or another --output_dir")
        started = time.time()
        scan = manifest_mod.scan_source(source)
        if not scan.utterances:
            raise UsageError(f"no audio files found under {source['path']} (expected "
                             "<dataset>/<speaker>/<utterance>.wav|flac|ogg|mp3)")
        data_mod.read_headers(scan.utterances, options.header_threads)
        log.info("scanned %d utterances in %.1f s", len(scan.utterances), time.time() - started)
        fresh = True
    stale = [r for r in ranks if r >= world]
    if stale and not options.overwrite:
        raise UsageError(f"{run_dir} holds results of more ranks ({', '.join(map(rank_dir_name, stale))}) than "
                         f"this run's world size {world}; rerun with the same world size or --overwrite")
    for rank in stale:  # --overwrite: results of a larger earlier run must not reach the merge
        run_dir.remove_rank(rank)
    if fresh:  # last: a scan that failed or was refused leaves no scan.json for another run to adopt
        run_dir.save_scan(scan)
    for error in scan.errors:
        log.warning("scan: %s: %s", error["path"], error["reason"])
    if scan.renames:
        log.warning("scan: %s", data_mod.describe_renames(scan.renames))
    return scan


def check_tree_unchanged(scan: data_mod.ScanResult, source: dict, run_dir: RunDir) -> None:
    """Walk the tree again (no header reads: ~6 s per million files) so that files added or removed
    since scan.json was written are not silently left out of, or kept in, a resumed run."""
    started = time.time()
    fresh = manifest_mod.scan_source(source)
    old = {u.key: u.path for u in scan.utterances}
    new = {u.key: u.path for u in fresh.utterances}
    added = sorted(k for k in new if old.get(k) != new[k])
    gone = sorted(k for k in old if k not in new)
    if added or gone:
        def some(keys):
            return ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")
        parts = ([f"{len(added)} new or moved (e.g. {some(added)})"] if added else []) + \
                ([f"{len(gone)} gone (e.g. {some(gone)})"] if gone else [])
        raise UsageError(f"{run_dir} cannot be resumed: {source['path']} changed since it was scanned: "
                         f"{'; '.join(parts)}. Use --overwrite to redo it all, or extract the new files into "
                         "another --output_dir (a --manifest can list them) and merge both output dirs")
    log.info("the tree still matches %s (checked in %.1f s)", run_dir.scan_path, time.time() - started)


def wait_for_rank0(run_dir: RunDir, identity: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    next_note = time.monotonic() + 60
    while True:
        marker = run_dir.read_ready()
        if marker is not None and marker.get("run_id") == identity:
            return marker
        if time.monotonic() > deadline:
            raise UsageError(f"rank 0 did not finish scanning the input within {timeout:.0f} s "
                             f"(no {run_dir.ready_path} for run {identity}); did rank 0 start and survive?")
        if time.monotonic() > next_note:
            log.info("waiting for rank 0 to scan the input (run %s)", identity)
            next_note = time.monotonic() + 300
        time.sleep(2.0)


def _scan_as_rank0(options, source, run_dir: RunDir, world: int, identity):
    """(scan, run id, lock, problem, kind, unexpected): rank 0's claim of the dir and its scan."""
    run_id = new_run_id(job_id())
    lock = None
    try:
        lock = run_dir.claim(run_id)
        if identity is not None:
            run_dir.clear_ready()
        return scan_on_rank0(options, source, run_dir, world), run_id, lock, "", "", None
    except (UsageError, data_mod.DataError, RunDirBusy) as exc:
        problem, kind, unexpected = str(exc), "usage", None
    except RunDirError as exc:
        problem, kind, unexpected = str(exc), "runtime", None
    except OSError as exc:  # disk full, read-only: one line naming the file
        problem, kind, unexpected = describe_os_error(exc), "runtime", None
    except Exception as exc:  # told to the other ranks, then raised here with its traceback
        problem, kind, unexpected = f"rank 0 failed while scanning: {type(exc).__name__}: {exc}", "runtime", exc
    if lock is not None:
        run_dir.release(lock)
    return None, run_id, None, problem, kind, unexpected


def prepare_scan(options: ExtractOptions, source: dict, run_dir: RunDir, rank: int, world: int,
                 dist_ready: bool):
    """(scan, run id, lock) for this rank; the lock is this rank's share of the run dir's."""
    identity = job_id() if world > 1 and not dist_ready else None
    if world > 1 and not dist_ready and identity is None:
        raise UsageError(f"{world} ranks but no way to coordinate them: set MASTER_ADDR and MASTER_PORT (a process "
                         "group), or run under Slurm, or set SPEAKERLAB_RUN_ID to one value on every rank")
    scan, run_id, lock, problem, kind, unexpected = None, "", None, "", "", None
    if rank == 0:
        scan, run_id, lock, problem, kind, unexpected = _scan_as_rank0(options, source, run_dir, world, identity)
    digest = scan_digest(scan) if scan else ""
    if world > 1:
        if dist_ready:
            box = [problem, kind, digest, run_id]
            torch.distributed.broadcast_object_list(box, src=0)
            problem, kind, digest, run_id = box
        elif rank == 0:
            publish(run_dir, {"run_id": identity, "run": run_id, "error": problem, "kind": kind, "scan_sha1": digest,
                              "time": datetime.now(timezone.utc).isoformat()})
        else:
            marker = wait_for_rank0(run_dir, identity, options.scan_timeout)
            problem, kind = marker.get("error", ""), marker.get("kind", "usage")
            digest, run_id = marker.get("scan_sha1", ""), marker.get("run", "")
    if unexpected is not None:
        raise unexpected
    if problem:
        message = problem if rank == 0 else f"rank 0: {problem}"
        raise UsageError(message) if kind == "usage" else RunDirError(message)
    if rank != 0:
        lock = run_dir.join(rank, run_id)
        try:
            scan = load_published_scan(run_dir, digest)
        except BaseException:
            lock.release()
            raise
    return scan, run_id, lock


def publish(run_dir: RunDir, marker: dict) -> None:
    run_dir.write_ready(marker)


def describe_os_error(exc: OSError) -> str:
    """One line: the file and the cause (disk full, read-only filesystem, permission)."""
    where = exc.filename if exc.filename is not None else ""
    cause = exc.strerror or str(exc) or type(exc).__name__
    return f"cannot write {where}: {cause}" if where else cause


def shared_scan(options: ExtractOptions, source: dict, run_dir: RunDir, rank: int, world: int):
    """(scan, run id, lock) every rank of this job uses: made (or reused) by rank 0, published to the others."""
    dist_ready = False
    if world > 1 and group_env() and not torch.distributed.is_initialized():
        # rank and world given explicitly: under srun only SLURM_* say them, RANK/WORLD_SIZE are unset
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                             timeout=timedelta(seconds=max(options.scan_timeout, 60)))
        dist_ready = True
    try:
        return prepare_scan(options, source, run_dir, rank, world, dist_ready)
    finally:
        if dist_ready:
            torch.distributed.destroy_process_group()


def scan_digest(scan: data_mod.ScanResult) -> str:
    """What sharding depends on: every utterance's key, audio, segment and length."""
    digest = hashlib.sha1()
    for u in scan.utterances:
        digest.update(f"{u.key}\0{u.path}\0{u.start}\0{u.end}\0{u.sample_rate}\0{u.num_samples}\n"
                      .encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def load_published_scan(run_dir: RunDir, digest: str, patience: float = 120.0) -> data_mod.ScanResult:
    """Rank 0's scan.json, checked against the digest it announced. A shared filesystem's client cache
    may show the previous file for a while after rank 0 replaced it, so mismatches are retried."""
    deadline = time.monotonic() + patience
    while True:
        try:
            scan = run_dir.load_scan()
            if scan_digest(scan) == digest:
                return scan
            problem = "it differs from the one rank 0 announced"
        except RunDirError as exc:
            problem = str(exc)
        if time.monotonic() > deadline:
            raise UsageError(f"{run_dir.scan_path} is not the scan rank 0 made for this run: {problem} (another run "
                             "writing to the same --output_dir?)")
        time.sleep(2.0)


def tell_waiting_ranks(run_dir: RunDir, message: str, kind: str) -> None:
    """Rank 0 failed before publishing its scan (no process group): say so, so others stop waiting."""
    rank, world, _, _ = rank_info()
    identity = job_id()
    if rank != 0 or world == 1 or identity is None or group_env() or not run_dir.path.is_dir():
        return
    marker = run_dir.read_ready()
    if marker is not None and marker.get("run_id") == identity:
        return  # already published (the scan went through, or its error was told)
    try:
        publish(run_dir, {"run_id": identity, "error": message, "kind": kind, "scan_sha1": ""})
    except OSError:
        pass

