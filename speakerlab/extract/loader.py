"""Decoding in DataLoader workers: the dataset, batches as a named tuple, and the crash journal that
names the file a dead decoder was on."""
import os
import re
import time
import shutil
from pathlib import Path
from typing import List, NamedTuple, Optional

import torch

from speakerlab.audio import AudioError, load_audio
from speakerlab.batching import pad_waves

# A rank gives up (and a rerun resumes) after this many decoder crashes in one run.
MAX_DECODER_CRASHES = 100


class DecodeJournal:
    """Which file each decode worker process is decoding, one small file per worker pid.

    A decoder that crashes the process (a segfault in a codec library, the kernel's OOM killer)
    leaves no Python exception to catch; the journal of the dead pid names its file, so that file is
    listed as failed and the rank goes on without it instead of dying on it at every rerun.
    """

    WIDTH = 16

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self._fd = None
        self._pid = None

    def _open(self):
        if self._pid != os.getpid():  # first use in this (forked) worker
            self.dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.dir / str(os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._pid = os.getpid()
        return self._fd

    def start(self, index: int) -> None:
        os.pwrite(self._open(), f"{index:>{self.WIDTH}}".encode(), 0)

    def finish(self) -> None:
        os.pwrite(self._open(), b" " * self.WIDTH, 0)

    def current(self, pid: int) -> Optional[int]:
        try:
            text = (self.dir / str(pid)).read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def forget(self, pid: int) -> None:
        (self.dir / str(pid)).unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class WaveDataset(torch.utils.data.Dataset):
    def __init__(self, utterances, sample_rate: int, channels: str, journal: Optional[DecodeJournal] = None):
        self.utterances = utterances
        self.sample_rate = sample_rate
        self.channels = channels
        self.journal = journal

    def __len__(self):
        return len(self.utterances)

    def __getitem__(self, index):
        utt = self.utterances[index]
        if self.journal is not None:
            self.journal.start(index)
        try:
            return index, load_audio(utt.path, self.sample_rate, self.channels, utt.start, utt.end)
        except AudioError as exc:
            return index, exc
        except Exception as exc:  # anything unforeseen is still one file's failure, not the rank's
            return index, AudioError(utt.path, "decode", f"{type(exc).__name__}: {exc}")
        finally:
            if self.journal is not None:
                self.journal.finish()


class Batch(NamedTuple):
    """One decoded batch: ``waves`` (B, N) padded, ``lengths`` (B,) sample counts, ``indices`` their
    dataset indices; ``bad`` the [(index, AudioError)] of files that did not decode; ``feats`` the
    (B, T, F) fbank when the decode worker computed it (CPU runs: ``waves`` is then None)."""
    indices: List[int]
    waves: Optional[torch.Tensor]
    lengths: torch.Tensor
    bad: list
    feats: Optional[torch.Tensor] = None


def collate(items, fbank=None) -> Batch:
    """Pad a batch's decoded files; with ``fbank`` (an ``features.Fbank``), compute its features here,
    in the decode worker: on CPU that takes the fbank off the model's cores (and the features are half
    the size of the waves they replace). Should the fbank fail, the waves go on instead and the model
    side computes it (and fails just the files that make it fail)."""
    good = [(i, w) for i, w in items if not isinstance(w, AudioError)]
    bad = [(i, w) for i, w in items if isinstance(w, AudioError)]
    waves, lengths = pad_waves([w for _, w in good])
    if fbank is not None and good:
        try:
            with torch.inference_mode():
                feats, _ = fbank(waves, lengths)
            return Batch([i for i, _ in good], None, lengths, bad, feats)
        except Exception:
            pass
    return Batch([i for i, _ in good], waves, lengths, bad)


_DEAD_WORKER = re.compile(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\) (exited unexpectedly|is killed by signal: .*)")


def dead_workers(exc: BaseException):
    """(pids, how) of the decode workers a DataLoader error reports dead, or None for other errors."""
    match = _DEAD_WORKER.search(str(exc))
    if not match:
        return None
    pids = [int(p) for p in re.findall(r"\d+", match.group(1))]
    return pids, match.group(2).rstrip(". ")


def death_behind(exc: BaseException, patience: float = 1.0) -> Optional[BaseException]:
    """torch's dead-worker error behind a loader error that is not one (e.g. ConnectionResetError
    while taking a batch's shared memory from a worker killed in between, before the SIGCHLD handler
    has spoken), or None if no decode worker died. Asks torch's own check of its workers' pids."""
    if dead_workers(exc) is not None:
        return exc
    try:
        from torch.utils.data._utils.signal_handling import _error_if_any_worker_fails
    except ImportError:  # private API gone: the error stays the rank's
        return None
    deadline = time.monotonic() + patience
    while True:
        try:
            _error_if_any_worker_fails()
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)  # (where torch's SIGCHLD handler may raise it too)
        except RuntimeError as death:
            return death if dead_workers(death) is not None else None


def quiet_workers(batches) -> bool:
    """Take a started loader's workers out of torch's SIGCHLD check until ``watch_workers``: a worker
    that dies meanwhile (a decoder crash while the model loads) then raises nothing wherever the main
    thread is (mid-load, mid-write), and is reported by ``watch_workers`` instead. False (and nothing
    changed) where torch's private API for it is missing."""
    try:
        from torch.utils.data._utils.signal_handling import _remove_worker_pids
        if not getattr(batches, "_worker_pids_set", False):
            return False
        _remove_worker_pids(id(batches))
    except (ImportError, RuntimeError):
        return False
    batches._worker_pids_set = False  # so its shutdown does not remove them again
    return True


def watch_workers(batches) -> None:
    """Hand the workers of a ``quiet_workers`` loader back to torch's SIGCHLD check, and raise its
    dead-worker error now if one died while they were out of it."""
    from torch.utils.data._utils.signal_handling import _error_if_any_worker_fails, _set_worker_pids
    _set_worker_pids(id(batches), tuple(w.pid for w in batches._workers))
    batches._worker_pids_set = True
    _error_if_any_worker_fails()


def crashed_files(exc: BaseException, journal: Optional[DecodeJournal], pending) -> list:
    """[(dataset index, how)] for the pending files dead decode workers were on; [] if unknown.
    Each dead worker's journal is removed once read (a later worker may reuse its pid)."""
    dead = dead_workers(exc)
    if dead is None or journal is None:
        return []
    pids, how = dead
    found = []
    for pid in pids:
        index = journal.current(pid)
        journal.forget(pid)
        if index is not None and index in pending:
            found.append((index, how))
    return found
