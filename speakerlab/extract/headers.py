"""Header reads shared by the ranks: each reads a 1/world slice of the walked files.

Rank 0 walks the input and writes the walk (the scan file without header fields); every rank reads
the headers of rows ``data.header_slice(count, rank, world)`` and writes them to its own header
file in the run dir, tagged with the job's run id; rank 0 gathers the files into the scan. With a
process group the ranks meet at a barrier before the gather; without one (srun), rank 0 waits for
the files to appear. A rank that fails says so in its file, so rank 0 stops at once with its reason.
"""
import logging
import time
from pathlib import Path
from typing import Callable, List, Optional

from speakerlab import data as data_mod
from speakerlab import scanfile

log = logging.getLogger("speakerlab")


def read_slice(walk: Path, rank: int, world: int, out: Path, run_id: str, threads: int) -> int:
    """Read this rank's slice of the headers into ``out``; returns how many were read."""
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
            scanfile.save_headers(out, 0, [], run_id, error=f"rank {rank}: {type(exc).__name__}: {exc}")
        except OSError:
            pass
        raise
    log.info("rank %d read the headers of %d of %d files (rows %d-%d) in %.1f s", rank, read, total, first, last,
             time.time() - started)
    return read


def gather(scan: data_mod.ScanResult, paths: List[Path], run_id: str, timeout: float,
           poll: float = 1.0, alive: Optional[Callable[[], None]] = None) -> List[int]:
    """Apply every rank's header file to ``scan`` (rank 0); returns the count each rank read.
    Waits up to ``timeout`` seconds for files not there yet; a rank's error is raised here."""
    deadline = time.monotonic() + timeout
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
        if alive is not None:
            alive()
        time.sleep(poll)
    if sum(counts) != len(scan.utterances):
        raise RuntimeError(f"the ranks read {sum(counts)} headers for {len(scan.utterances)} files")
    return counts
