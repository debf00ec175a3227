"""The input is scanned once, by rank 0, and published to the other ranks.

Rank 0 alone reads the input and writes scan.json (atomically); the other ranks wait for it, then
load it. With a process group (torchrun, or MASTER_ADDR/MASTER_PORT set under srun) rank 0's
outcome is broadcast; without one (plain srun) rank 0 publishes it in scan.ready.json tagged with
this job's id (the Slurm job/step/restart), so a stale scan.json or marker of an earlier run is
never taken for this one, and rank 0's errors reach every rank instead of leaving them waiting.
"""
import hashlib
import logging
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch

from speakerlab import data as data_mod
from speakerlab import manifest as manifest_mod
from speakerlab.extract.options import ExtractOptions, UsageError
from speakerlab.extract.runtime import group_env, job_id, rank_info
from speakerlab.store import atomic_write_json, read_json

log = logging.getLogger("speakerlab")


def scan_path(output_dir: Path) -> Path:
    return output_dir / "scan.json"


def ready_path(output_dir: Path) -> Path:
    return output_dir / "scan.ready.json"


def scan_on_rank0(options: ExtractOptions, source: dict, output_dir: Path, world: int) -> data_mod.ScanResult:
    path = scan_path(output_dir)
    if path.is_file() and not options.overwrite:
        scan = data_mod.load_scan(path)
        change = manifest_mod.source_changed(scan.source, source)
        if change:
            raise UsageError(f"{output_dir} cannot be resumed: {change}; use another --output_dir or --overwrite")
        if source["type"] == "tree":  # manifests and Kaldi dirs are checked by their hash above
            check_tree_unchanged(scan, source, output_dir)
        log.info("reusing %s (%d utterances)", path, len(scan.utterances))
    else:
        started = time.time()
        scan = manifest_mod.scan_source(source)
        if not scan.utterances:
            raise UsageError(f"no audio files found under {source['path']} (expected "
                             "<dataset>/<speaker>/<utterance>.wav|flac|ogg|mp3)")
        data_mod.read_headers(scan.utterances, options.header_threads)
        data_mod.save_scan(scan, path)
        log.info("scanned %d utterances in %.1f s", len(scan.utterances), time.time() - started)
    for error in scan.errors:
        log.warning("scan: %s: %s", error["path"], error["reason"])
    if scan.renames:
        log.warning("scan: %s", data_mod.describe_renames(scan.renames))
    stale = sorted(p for p in output_dir.glob("rank_*")
                   if p.is_dir() and p.name[5:].isdigit() and int(p.name[5:]) >= world)
    if stale and not options.overwrite:
        raise UsageError(f"{output_dir} holds results of more ranks ({', '.join(p.name for p in stale)}) than "
                         f"this run's world size {world}; rerun with the same world size or --overwrite")
    for directory in stale:  # --overwrite: results of a larger earlier run must not reach the merge
        shutil.rmtree(directory, ignore_errors=True)
    return scan


def check_tree_unchanged(scan: data_mod.ScanResult, source: dict, output_dir: Path) -> None:
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
        raise UsageError(f"{output_dir} cannot be resumed: {source['path']} changed since it was scanned: "
                         f"{'; '.join(parts)}. Use --overwrite to redo it all, or extract the new files into "
                         "another --output_dir (a --manifest can list them) and merge both output dirs")
    log.info("the tree still matches %s (checked in %.1f s)", scan_path(output_dir), time.time() - started)


def wait_for_rank0(output_dir: Path, identity: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    next_note = time.monotonic() + 60
    while True:
        try:
            marker = read_json(ready_path(output_dir))
            if marker.get("run_id") == identity:
                return marker
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise UsageError(f"rank 0 did not finish scanning the input within {timeout:.0f} s "
                             f"(no {ready_path(output_dir)} for run {identity}); did rank 0 start and survive?")
        if time.monotonic() > next_note:
            log.info("waiting for rank 0 to scan the input (run %s)", identity)
            next_note = time.monotonic() + 300
        time.sleep(2.0)


def prepare_scan(options: ExtractOptions, source: dict, output_dir: Path, rank: int, world: int,
                 dist_ready: bool) -> data_mod.ScanResult:
    identity = job_id() if world > 1 and not dist_ready else None
    if world > 1 and not dist_ready and identity is None:
        raise UsageError(f"{world} ranks but no way to coordinate them: set MASTER_ADDR and MASTER_PORT (a process "
                         "group), or run under Slurm, or set SPEAKERLAB_RUN_ID to one value on every rank")
    scan, problem, unexpected = None, "", None
    if rank == 0:
        if identity is not None:
            ready_path(output_dir).unlink(missing_ok=True)
        try:
            scan = scan_on_rank0(options, source, output_dir, world)
        except (UsageError, data_mod.DataError) as exc:
            problem = str(exc)
        except Exception as exc:  # told to the other ranks, then raised here with its traceback
            problem, unexpected = f"rank 0 failed while scanning: {type(exc).__name__}: {exc}", exc
    if world > 1:
        if dist_ready:
            box = [problem, scan_digest(scan) if scan else ""]
            torch.distributed.broadcast_object_list(box, src=0)
            problem, digest = box
        elif rank == 0:
            digest = scan_digest(scan) if scan else ""
            atomic_write_json(ready_path(output_dir), {"run_id": identity, "error": problem, "scan_sha1": digest,
                                                       "time": datetime.now(timezone.utc).isoformat()})
        else:
            marker = wait_for_rank0(output_dir, identity, options.scan_timeout)
            problem, digest = marker.get("error", ""), marker.get("scan_sha1", "")
    if unexpected is not None:
        raise unexpected
    if problem:
        raise UsageError(problem if rank == 0 else f"rank 0: {problem}")
    if rank != 0:
        scan = load_published_scan(scan_path(output_dir), digest)
    return scan


def scan_digest(scan: data_mod.ScanResult) -> str:
    """What sharding depends on: every utterance's key, audio, segment and length."""
    digest = hashlib.sha1()
    for u in scan.utterances:
        digest.update(f"{u.key}\0{u.path}\0{u.start}\0{u.end}\0{u.sample_rate}\0{u.num_samples}\n"
                      .encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def load_published_scan(path: Path, digest: str, patience: float = 120.0) -> data_mod.ScanResult:
    """Rank 0's scan.json, checked against the digest it announced. A shared filesystem's client cache
    may show the previous file for a while after rank 0 replaced it, so mismatches are retried."""
    deadline = time.monotonic() + patience
    while True:
        try:
            scan = data_mod.load_scan(path)
            if scan_digest(scan) == digest:
                return scan
            problem = "it differs from the one rank 0 announced"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problem = f"unreadable ({exc})"
        if time.monotonic() > deadline:
            raise UsageError(f"{path} is not the scan rank 0 made for this run: {problem} (another run "
                             "writing to the same --output_dir?)")
        time.sleep(2.0)


def tell_waiting_ranks(output_dir: Path, message: str) -> None:
    """Rank 0 failed before publishing its scan (no process group): say so, so others stop waiting."""
    rank, world, _, _ = rank_info()
    identity = job_id()
    if rank != 0 or world == 1 or identity is None or group_env() or not output_dir.is_dir():
        return
    try:
        if read_json(ready_path(output_dir)).get("run_id") == identity:
            return  # already published (the scan went through, or its error was told)
    except (OSError, ValueError):
        pass
    try:
        atomic_write_json(ready_path(output_dir), {"run_id": identity, "error": message, "scan_sha1": ""})
    except OSError:
        pass


def shared_scan(options: ExtractOptions, source: dict, output_dir: Path, rank: int, world: int) -> data_mod.ScanResult:
    """The scan every rank of this job uses: made (or reused) by rank 0, published to the others."""
    dist_ready = False
    if world > 1 and group_env() and not torch.distributed.is_initialized():
        # rank and world given explicitly: under srun only SLURM_* say them, RANK/WORLD_SIZE are unset
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                             timeout=timedelta(seconds=max(options.scan_timeout, 60)))
        dist_ready = True
    try:
        return prepare_scan(options, source, output_dir, rank, world, dist_ready)
    finally:
        if dist_ready:
            torch.distributed.destroy_process_group()
