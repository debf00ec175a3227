"""Header reads shared by the ranks: each reads a 1/world slice of the walked files.

Rank 0 walks the input and writes the walk (the scan file without header fields); every rank claims
its slice (rows ``data.header_slice(count, rank, world)``: an exclusively created claim file), reads
those headers and writes them to its own header file in the run dir, tagged with the job's run id;
rank 0 gathers the files into the scan. A slice nobody claimed ``GRACE_S`` seconds after rank 0
finished its own (a rank that never started) is claimed and read by rank 0, so a job missing ranks
still gets its scan. A rank that fails says so in its file, so rank 0 stops at once with its reason.
"""
import logging
import os
import time
from pathlib import Path
from typing import Callable, List, Optional

from speakerlab import data as data_mod
from speakerlab import scanfile

log = logging.getLogger("speakerlab")


GRACE_S = 10.0


def claim(path: Path, run_id: str) -> bool:
    """Take a slice: True if this process created the claim file, False if another one did."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, run_id.encode("utf-8"))
    finally:
        os.close(fd)
    return True


def read_slice(walk: Path, rank: int, world: int, out: Path, run_id: str, threads: int,
               reader: Optional[int] = None) -> int:
    """Read slice ``rank`` of the headers into ``out`` (by rank ``reader``, default ``rank``); returns
    how many were read."""
    reader = rank if reader is None else reader
    started = time.time()
    try:
        with scanfile.ScanFile(walk) as handle:
            first, last = data_mod.header_slice(handle.count, rank, world)
            rows = handle.rows(first, last)
            total = handle.count
        read = data_mod.read_headers(rows, threads)
        scanfile.save_headers(out, first, rows, run_id)
    except Exception as exc:
        try:  # rank 0 learns why at once, instead of waiting for a file that will not come
            scanfile.save_headers(out, 0, [], run_id, error=f"rank {reader}: {type(exc).__name__}: {exc}")
        except OSError:
            pass
        raise
    whose = "" if reader == rank else f" (the slice of rank {rank}, which did not claim it)"
    log.info("rank %d read the headers of %d of %d files (rows %d-%d)%s in %.1f s", reader, read, total, first, last,
             whose, time.time() - started)
    return read


def gather(scan: data_mod.ScanResult, paths: List[Path], run_id: str, timeout: float,
           poll: float = 0.25, take_over: Optional[Callable[[int], bool]] = None) -> List[int]:
    """Apply every rank's header file to ``scan`` (rank 0); returns the count each slice holds.
    Waits up to ``timeout`` seconds for files not there yet; a rank's error is raised here.
    ``take_over(r)``: called for slices still missing after ``GRACE_S``; True if it read slice r."""
    deadline = time.monotonic() + timeout
    grace = time.monotonic() + GRACE_S
    counts: List[Optional[int]] = [None] * len(paths)
    while True:
        for rank, path in enumerate(paths):
            if counts[rank] is not None:
                continue
            found = scanfile.load_headers(path, run_id)
            if found is None:
                continue
            first, columns = found
            if columns.get("error"):
                raise RuntimeError(columns["error"])
            scanfile.apply_headers(scan.utterances[first:first + len(columns["rate"])], columns)
            counts[rank] = len(columns["rate"])
        if all(c is not None for c in counts):
            break
        if time.monotonic() > deadline:
            missing = [str(r) for r, c in enumerate(counts) if c is None]
            raise RuntimeError(f"rank(s) {', '.join(missing)} did not read their share of the headers within "
                               f"{timeout:.0f} s (no {paths[int(missing[0])].name} for this run)")
        if take_over is not None and time.monotonic() > grace:
            for rank, path in enumerate(paths):
                if counts[rank] is None and take_over(rank):
                    break  # read now: applied on the next pass
            else:
                time.sleep(poll)
            continue
        time.sleep(poll)
    if sum(counts) != len(scan.utterances):
        raise RuntimeError(f"the ranks read {sum(counts)} headers for {len(scan.utterances)} files")
    return counts
