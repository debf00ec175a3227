"""The input is scanned once, for all ranks, and published to them with the job's run id.

Rank 0 takes the run dir's lock (one job per dir) and walks the input. The header reads, the slow
part (52-121 s per million files), are shared: with several ranks, rank 0 writes the walk, every
rank reads the headers of its 1/world slice of it (``headers.py``, counted in the log), and rank 0
gathers them and writes the scan file (whole, and only once the scan and its checks are done), cut
into contiguous duration-balanced shards. Every rank then reads only its own rows of it and holds its
share of the lock. With a process group (torchrun, or MASTER_ADDR/MASTER_PORT set under srun)
rank 0's outcome is broadcast; without one (plain srun) rank 0 publishes it in the run dir's ready
marker tagged with this job's id (the Slurm job/step/restart), so a stale scan or marker of an
earlier run is never taken for this one, and rank 0's errors reach every rank instead of leaving
them waiting.
"""
import logging
import time
from datetime import datetime, timedelta, timezone

import torch

from speakerlab import data as data_mod
from speakerlab import manifest as manifest_mod
from speakerlab.extract import headers
from speakerlab.extract.options import ExtractOptions, UsageError
from speakerlab.extract.runtime import group_env, job_id, rank_info
from speakerlab.rundir import RunDir, RunDirBusy, RunDirError, new_run_id, rank_dir_name

log = logging.getLogger("speakerlab")


def scan_on_rank0(options: ExtractOptions, source: dict, run_dir: RunDir, world: int, share: bool = False):
    """(scan, fresh): the scan reused, or the input walked (headers read here unless ``share``)."""
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
        # empty rank dirs (left by a clean-up killed half way) hold no results
        held = [r for r in ranks if any(p.is_file() for p in run_dir.rank_dir(r).rglob("*"))]
        if held and not options.overwrite:  # results without the scan they were made from
            raise UsageError(f"{run_dir} holds rank results ({', '.join(map(rank_dir_name, held))}) but no "
                             f"{run_dir.scan_path.name} to tell what they were made from; use --overwrite or another --output_dir")
        started = time.time()
        scan = manifest_mod.scan_source(source)
        if not scan.utterances:
            raise UsageError(f"no audio files found under {source['path']} (expected "
                             "<dataset>/<speaker>/<utterance>.wav|flac|ogg|mp3)")
        if not share:
            data_mod.read_headers(scan.utterances, options.header_threads)
        log.info("%s %d utterances in %.1f s", "walked" if share else "scanned", len(scan.utterances),
                 time.time() - started)
        fresh = True
    stale = [r for r in ranks if r >= world]
    if stale and not options.overwrite:
        raise UsageError(f"{run_dir} holds results of more ranks ({', '.join(map(rank_dir_name, stale))}) than "
                         f"this run's world size {world}; rerun with the same world size or --overwrite")
    for rank in stale:  # --overwrite: results of a larger earlier run must not reach the merge
        run_dir.remove_rank(rank)
    for error in scan.errors:
        log.warning("scan: %s: %s", error["path"], error["reason"])
    if scan.renames:
        log.warning("scan: %s", data_mod.describe_renames(scan.renames))
    return scan, fresh


def publish_scan(run_dir: RunDir, scan: data_mod.ScanResult, fresh: bool, world: int) -> str:
    """Write the scan file (last: a scan that failed or was refused leaves none for another run to
    adopt) cut into shards for ``world`` ranks; a reused one is rewritten only if it was cut for
    another world size. Returns its scan id."""
    if fresh or scan.meta.get("shard_world") != world:
        return run_dir.save_scan(scan, world)["scan_id"]
    return scan.meta["scan_id"]


def check_tree_unchanged(scan: data_mod.ScanResult, source: dict, run_dir: RunDir) -> None:
    """Walk the tree again (no header reads: ~6 s per million files) so that files added or removed
    since the scan was written are not silently left out of, or kept in, a resumed run."""
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


def wait_for_rank0(run_dir: RunDir, identity: str, timeout: float, phase: int = 2) -> dict:
    """Rank 0's marker for this job: phase 1 (the walk, or the reused scan), 2 (the scan), or an error."""
    deadline = time.monotonic() + timeout
    next_note = time.monotonic() + 60
    while True:
        marker = run_dir.read_ready()
        if marker is not None and marker.get("run_id") == identity and \
                (marker.get("error") or marker.get("phase", 2) >= phase):
            return marker
        if time.monotonic() > deadline:
            raise UsageError(f"rank 0 did not finish scanning the input within {timeout:.0f} s "
                             f"(no {run_dir.ready_path} for run {identity}); did rank 0 start and survive?")
        if time.monotonic() > next_note:
            log.info("waiting for rank 0 to scan the input (run %s)", identity)
            next_note = time.monotonic() + 300
        time.sleep(0.25)  # a small file read: cheap, and every second here is a second of every rank


def _scan_as_rank0(options, source, run_dir: RunDir, world: int, identity):
    """Rank 0's claim of the dir and its scan: {scan, run_id, lock, problem, kind, unexpected, walk,
    scan_id}; ``walk``: the ranks are to share the header reads of the walk just written."""
    out = {"scan": None, "run_id": new_run_id(job_id()), "lock": None, "problem": "", "kind": "",
           "unexpected": None, "walk": False, "scan_id": ""}
    try:
        out["lock"] = run_dir.claim(out["run_id"])
        if identity is not None:
            run_dir.clear_ready()
        scan, fresh = scan_on_rank0(options, source, run_dir, world, share=world > 1)
        out["scan"] = scan
        if fresh and world > 1:
            run_dir.remove_walk()  # header files and claims of an earlier job in this dir
            run_dir.save_walk(scan)
            out["walk"] = True
        else:
            out["scan_id"] = publish_scan(run_dir, scan, fresh, world)
        return out
    except BaseException as exc:
        _failed(out, exc)
    if out["lock"] is not None:
        run_dir.release(out["lock"])
        out["lock"] = None
    return out


def _failed(out: dict, exc: BaseException) -> None:
    """Record an error of rank 0's scan in ``out`` (told to the other ranks, then raised)."""
    if isinstance(exc, (UsageError, data_mod.DataError, RunDirBusy)):
        out.update(problem=str(exc), kind="usage")
    elif isinstance(exc, RunDirError):
        out.update(problem=str(exc), kind="runtime")
    elif isinstance(exc, OSError):  # disk full, read-only: one line naming the file
        out.update(problem=describe_os_error(exc), kind="runtime")
    elif isinstance(exc, Exception):  # told to the other ranks, then raised here with its traceback
        out.update(problem=f"rank 0 failed while scanning: {type(exc).__name__}: {exc}", kind="runtime",
                   unexpected=exc)
    else:
        raise exc


def _exchange(run_dir: RunDir, rank: int, world: int, dist_ready: bool, identity, options, phase: int,
              box: dict) -> dict:
    """Rank 0's ``box`` (problem, kind, run, walk, scan_id) to every rank: broadcast, or the ready marker."""
    if world == 1:
        return box
    if dist_ready:
        items = [box]
        torch.distributed.broadcast_object_list(items, src=0)
        return items[0]
    if rank == 0:
        publish(run_dir, {"run_id": identity, "phase": phase, "error": box["problem"], "kind": box["kind"],
                          "run": box["run"], "walk": box["walk"], "scan_id": box["scan_id"],
                          "time": datetime.now(timezone.utc).isoformat()})
        return box
    marker = wait_for_rank0(run_dir, identity, options.scan_timeout, phase)
    return {"problem": marker.get("error", ""), "kind": marker.get("kind", "usage"), "run": marker.get("run", ""),
            "walk": bool(marker.get("walk")) and marker.get("phase") == 1, "scan_id": marker.get("scan_id", "")}


def prepare_scan(options: ExtractOptions, source: dict, run_dir: RunDir, rank: int, world: int,
                 dist_ready: bool):
    """(this rank's shard of the scan, run id, lock); the lock is this rank's share of the run dir's."""
    identity = job_id() if world > 1 and not dist_ready else None
    if world > 1 and not dist_ready and identity is None:
        raise UsageError(f"{world} ranks but no way to coordinate them: set MASTER_ADDR and MASTER_PORT (a process "
                         "group), or run under Slurm, or set SPEAKERLAB_RUN_ID to one value on every rank")
    mine = {"problem": "", "kind": "", "unexpected": None, "lock": None}
    box = {"problem": "", "kind": "", "run": "", "walk": False, "scan_id": ""}
    if rank == 0:
        mine = _scan_as_rank0(options, source, run_dir, world, identity)
        box = {"problem": mine["problem"], "kind": mine["kind"], "run": mine["run_id"], "walk": mine["walk"],
               "scan_id": mine["scan_id"]}
    box = _exchange(run_dir, rank, world, dist_ready, identity, options, 1, box)
    if box["walk"] and not box["problem"]:
        box = share_header_reads(options, run_dir, rank, world, dist_ready, identity, box, mine)
    run_id = box["run"]
    if rank == 0 and mine["lock"] is not None and (box["problem"] or mine["unexpected"] is not None):
        run_dir.release(mine["lock"])
    if mine["unexpected"] is not None:
        raise mine["unexpected"]
    if box["problem"]:
        message = box["problem"] if rank == 0 else f"rank 0: {box['problem']}"
        raise UsageError(message) if box["kind"] == "usage" else RunDirError(message)
    lock = mine["lock"] if rank == 0 else run_dir.join(rank, run_id)
    mine["scan"] = None  # rank 0 too keeps only its shard (read back below), not the whole walk
    try:
        scan = load_published_shard(run_dir, rank, world, box["scan_id"])
    except BaseException:
        if rank != 0:
            lock.release()
        raise
    return scan, run_id, lock


def share_header_reads(options, run_dir: RunDir, rank: int, world: int, dist_ready: bool, identity, box: dict,
                       mine: dict) -> dict:
    """Every rank reads its slice of the headers; rank 0 gathers them and writes the scan (phase 2)."""
    try:
        if headers.claim(run_dir.claim_path(rank), box["run"]):
            headers.read_slice(run_dir.walk_path, rank, world, run_dir.header_path(rank), box["run"],
                               options.header_threads)
        else:
            log.info("rank %d: rank 0 read this rank's share of the headers (it started late)", rank)
    except Exception as exc:  # in its header file for rank 0; raised here after rank 0's verdict
        log.error("rank %d could not read its share of the headers: %s: %s", rank, type(exc).__name__, exc)
        if rank == 0:
            _failed(mine, exc)
    if rank == 0:
        try:
            if not mine["problem"]:
                def take_over(r):  # a rank that never claimed its slice: read it here
                    if not headers.claim(run_dir.claim_path(r), box["run"]):
                        return False
                    headers.read_slice(run_dir.walk_path, r, world, run_dir.header_path(r), box["run"],
                                       options.header_threads, reader=0)
                    return True
                counts = headers.gather(mine["scan"], [run_dir.header_path(r) for r in range(world)], box["run"],
                                        options.scan_timeout, take_over=take_over)
                log.info("header reads per rank: %s (%d files)", ", ".join(map(str, counts)), sum(counts))
                box = dict(box, scan_id=publish_scan(run_dir, mine["scan"], True, world))
        except RuntimeError as exc:  # a rank's error or its absence: one line for every rank
            _failed(mine, UsageError(str(exc)) if "did not read" in str(exc) else RunDirError(str(exc)))
        except BaseException as exc:
            _failed(mine, exc)
        finally:
            run_dir.remove_walk()
        box = dict(box, problem=mine["problem"], kind=mine["kind"])
        mine["scan"] = None  # rank 0 keeps only its shard, like every rank
    return _exchange(run_dir, rank, world, dist_ready, identity, options, 2, dict(box, walk=False))


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


def load_published_shard(run_dir: RunDir, rank: int, world: int, scan_id: str,
                         patience: float = 120.0) -> data_mod.ScanResult:
    """This rank's rows of the scan rank 0 announced (by its id). A shared filesystem's client cache
    may show the previous file for a while after rank 0 replaced it, so mismatches are retried."""
    deadline = time.monotonic() + patience
    while True:
        try:
            with run_dir.open_scan() as handle:
                if handle.meta.get("scan_id") == scan_id:
                    return handle.shard(rank, world)
            problem = "it differs from the one rank 0 announced"
        except (RunDirError, ValueError, OSError, KeyError) as exc:
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

