"""Host memory the decode workers need: /dev/shm for the batches they hand over, pinned memory on GPU.

Each decode worker returns its padded batch through shared memory (/dev/shm: torch's ``file_system``
sharing strategy uses it too, so switching strategy does not help), and up to ``workers x prefetch``
batches are in flight per rank. On GPU the default 120,000-frame batches are 77 MB each: 8 workers x
4 prefetched is 2.5 GB of /dev/shm per rank, and as much pinned (page-locked) memory. A container
started with Docker's 64 MB default /dev/shm would die on the first batch with a bus error or "No
space left on device" from inside a worker. So the loader is sized to what the host has, up front:
fewer batches in flight when that fits (noted in the log), else one clear error.
"""
import os
import shutil
from pathlib import Path
from typing import Optional, Tuple

SHM = "/dev/shm"


class HostMemoryError(RuntimeError):
    """The host cannot hold even one batch per decode worker in flight."""


def shm_free_bytes(path: str = SHM) -> Optional[int]:
    """Free bytes of the shared-memory filesystem; None where there is none to measure."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def memory_limit_bytes() -> Optional[int]:
    """This process's memory limit: its cgroup's (a container's) or the machine's RAM."""
    limits = []
    for file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            limits.append(int(text))
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    return min(limits) if limits else None


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.0f} MB"


def plan_in_flight(batch_bytes: int, workers: int, prefetch: int, ranks_on_node: int,
                   shm_free: Optional[int], pinned: bool = False,
                   memory_limit: Optional[int] = None) -> Tuple[int, int, Optional[str]]:
    """(workers, prefetch per worker, note or None) such that the batches in flight fit.

    ``batch_bytes`` is the largest planned batch. The ranks on a node share /dev/shm and the memory;
    a rank's share of /dev/shm is its part of the free space, of the memory half its part of the limit
    (pinned memory cannot be swapped, and torch caches what it pinned). Batches in flight are kept to
    half a share (room for the batch being pinned and for anything else): prefetch is lowered first,
    then workers. HostMemoryError when a single batch exceeds a share.
    """
    if workers <= 0:
        return workers, prefetch, None  # decoding in the rank: nothing crosses processes
    ranks = max(1, ranks_on_node)
    shares = []
    if shm_free is not None:
        shares.append(("/dev/shm", shm_free / ranks, shm_free))
    if pinned and memory_limit is not None:
        shares.append(("pinned memory", memory_limit / ranks / 2, memory_limit))
    want_workers, want_prefetch = workers, prefetch
    for what, share, total in shares:
        if batch_bytes > share:
            raise HostMemoryError(
                f"{what} too small: {_gb(total)} for {ranks} rank(s), and one batch of decoded audio is "
                f"{_gb(batch_bytes)}; give the container more (docker run --shm-size=8g), or use smaller "
                f"batches (--batch_frames), or decode in the rank itself (--num_workers 0, slower)")
        while workers * prefetch * batch_bytes > share / 2 and prefetch > 1:
            prefetch -= 1
        while workers * prefetch * batch_bytes > share / 2 and workers > 1:
            workers -= 1
    note = None
    if (workers, prefetch) != (want_workers, want_prefetch):
        note = (f"{', '.join(f'{w} {_gb(t)}' for w, _, t in shares)} for {ranks} rank(s): "
                f"{workers} decode worker(s) x {prefetch} batch(es) of up to {_gb(batch_bytes)} in flight "
                f"instead of {want_workers} x {want_prefetch}")
    return workers, prefetch, note
