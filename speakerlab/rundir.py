"""The intermediate (run) dir of an extraction: the only code that knows its files.

Layout of ``output_dir``::

    extract.lock                   the lock: {run_id, host, pid, started} of the job holding the dir;
                                   byte 0 is held (POSIX lock) by that job's rank 0, byte 1 + r by its rank r
    scan.json                      the utterance list, written once by rank 0 when the scan is complete
    scan.ready.json                rank 0's scan outcome for ranks without a process group (srun)
    rank_00/metadata.json          fingerprint, run id, host and pid, counts, the complete flag
    rank_00/parts/part_000001.npz  flushed work: keys, embeddings, failures (no pickle)
    rank_00/decoding/<pid>         the decode journal: the file each decode worker is on
    rank_00/embeddings.npz         all of the rank's embeddings (when complete)
    rank_00/utterance_embeddings.pkl, speaker_embeddings.pkl   the seed's per-rank pickles

Every file is written to a temporary name and renamed, so a reader never sees half a file and a
killed rank loses at most the batches since its last flush.

A *run id* names one extraction job; all ranks of the job share it (rank 0 makes it and publishes it
with the scan). Each rank's metadata records the run id that wrote it, the final dir's completeness
record names the run ids it was merged from, and clean-up removes a run dir only when they match.
One job per dir: the lock is held by live processes only (POSIX locks die with their process, also
on NFS), so a dead job's lock is stale by construction and the next job takes it over.
"""
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from speakerlab import data as data_mod
from speakerlab.store import (atomic_write_json, atomic_write_npz, atomic_write_pickle, is_temp_name, read_json,
                              remove_temp_files)

log = logging.getLogger("speakerlab")

SCAN = "scan.json"
READY = "scan.ready.json"
LOCK = "extract.lock"
METADATA = "metadata.json"
EMBEDDINGS = "embeddings.npz"
RANK_PICKLES = ("utterance_embeddings.pkl", "speaker_embeddings.pkl")
PARTS = "parts"
JOURNAL = "decoding"
_RANK_DIR = re.compile(r"rank_(\d+)")
_PART = re.compile(r"part_\d{6}\.npz(\.damaged)?")


class RunDirError(Exception):
    """The run dir cannot be used as it is (unreadable, unwritable, made by another run): one line."""


class RunDirBusy(RunDirError):
    """Another live job holds the run dir."""


def rank_dir_name(rank: int) -> str:
    return f"rank_{rank:02d}"


def new_run_id(job: Optional[str] = None) -> str:
    """A fresh run id; ``job`` (a Slurm job/step or $SPEAKERLAB_RUN_ID) prefixes it when given."""
    stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    return f"{job}-{stamp}" if job else stamp


def keys_digest(utterances) -> str:
    digest = hashlib.sha1()
    for utt in utterances:
        digest.update(utt.key.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def scan_fingerprint(scan: data_mod.ScanResult) -> dict:
    """What a rank's results depend on in the scan; merge checks ranks against the scan beside them."""
    return {"data_root": scan.data_root, "source": scan.source, "num_utterances": len(scan.utterances),
            "keys_sha1": keys_digest(scan.utterances)}


# --- the lock ------------------------------------------------------------------------------
class Lock:
    """A held byte range of ``extract.lock``. Content is read and written through this fd only: with
    POSIX locks, closing any fd of the file in this process would drop the locks."""

    def __init__(self, path: Path, fd: int, offsets: List[int]):
        self.path, self.fd, self.offsets = path, fd, offsets

    def content(self) -> dict:
        return _read_fd(self.fd)

    def release(self) -> None:
        if self.fd is None:
            return
        for offset in self.offsets:
            _unlock(self.fd, offset)
        os.close(self.fd)
        self.fd = None


def _read_fd(fd: int) -> dict:
    size = os.fstat(fd).st_size
    try:
        return json.loads(os.pread(fd, size, 0).decode("utf-8")) if size else {}
    except ValueError:
        return {}


_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
_warned_no_locks = set()


def _try_lock(fd: int, offset: int, length: int = 1, path=LOCK) -> bool:
    """True when taken, False when another process holds it. On a filesystem without POSIX locks
    (Lustre mounted without ``flock``, some FUSE mounts) nothing can be enforced: a warning, and True,
    rather than refusing every run there."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, offset)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if exc.errno not in _NO_LOCKS:
            raise RunDirError(f"cannot lock {path}: {exc.strerror or exc}") from None
        if str(path) not in _warned_no_locks:
            _warned_no_locks.add(str(path))
            log.warning("cannot lock %s (%s): this filesystem has no POSIX locks, so a second job writing "
                        "into the same dir cannot be detected; run one job per --output_dir", path,
                        exc.strerror or exc)
        return True


def _unlock(fd: int, offset: int, length: int = 1) -> None:
    try:
        fcntl.lockf(fd, fcntl.LOCK_UN, length, offset)
    except OSError:
        pass  # never held (a filesystem without locks), or gone with the fd


def _describe_holder(info: dict) -> str:
    return (f"run {info.get('run_id', '?')}, host {info.get('host', '?')}, pid {info.get('pid', '?')}, "
            f"since {info.get('started', '?')}")


# --- the run dir ---------------------------------------------------------------------------
class RunDir:
    def __init__(self, path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def scan_path(self) -> Path:
        return self.path / SCAN

    @property
    def ready_path(self) -> Path:
        return self.path / READY

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    def rank_dir(self, rank: int) -> Path:
        return self.path / rank_dir_name(rank)

    def journal_dir(self, rank: int) -> Path:
        return self.rank_dir(rank) / JOURNAL

    def ranks(self) -> List[int]:
        """The ranks that have a dir here, sorted."""
        if not self.path.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.path.iterdir()
                      if (m := _RANK_DIR.fullmatch(p.name)) and p.is_dir())

    def has_scan(self) -> bool:
        return self.scan_path.is_file()

    # --- writability ---
    def ensure_writable(self) -> None:
        """Create the dir and prove a file can be written there, before anything expensive runs."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create {self.path}: {exc.strerror or exc}") from None
        probe = self.path / f".write-test.tmp{os.getpid()}"
        try:
            with open(probe, "wb") as handle:
                handle.write(b"x")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise RunDirError(f"cannot write to {self.path}: {exc.strerror or exc}") from None
        finally:
            try:
                probe.unlink()
            except OSError:
                pass

    # --- the scan ---
    def load_scan(self) -> data_mod.ScanResult:
        try:
            return data_mod.load_scan(self.scan_path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
            raise RunDirError(f"{self.scan_path} is unreadable ({reason}); it was cut short or damaged: "
                              "rerun with --overwrite to scan again") from None

    def save_scan(self, scan: data_mod.ScanResult) -> None:
        """Write scan.json whole or not at all (a temp dir beside it is removed whatever happens)."""
        tmp = self.path / f".scan.tmp{os.getpid()}"
        try:
            tmp.mkdir(exist_ok=True)
            data_mod.save_scan(scan, tmp / SCAN)
            os.replace(tmp / SCAN, self.scan_path)
        except OSError as exc:  # named by the file it was writing, not by the temp dir
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.scan_path)) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def remove_scan(self) -> None:
        self.scan_path.unlink(missing_ok=True)

    # --- rank 0's published outcome (no process group) ---
    def read_ready(self) -> Optional[dict]:
        try:
            return read_json(self.ready_path)
        except (OSError, ValueError):
            return None

    def write_ready(self, marker: dict) -> None:
        atomic_write_json(self.ready_path, marker)

    def clear_ready(self) -> None:
        self.ready_path.unlink(missing_ok=True)

    # --- the lock ---
    def _open_lock(self) -> int:
        return os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)

    def claim(self, run_id: str) -> Lock:
        """Take the dir for job ``run_id`` (rank 0): refused while another live job holds it."""
        try:
            fd = self._open_lock()
        except OSError as exc:
            raise RunDirError(f"cannot create {self.lock_path}: {exc.strerror or exc}") from None
        try:
            previous = _read_fd(fd)
            if not _try_lock(fd, 0, 1, self.lock_path):
                raise RunDirBusy(f"{self.path} is in use by another extraction ({_describe_holder(previous)}); "
                                 "wait for it to finish, or use another --output_dir")
            if not _try_lock(fd, 1, 0, self.lock_path):  # a rank of an earlier job still running after its rank 0 ended
                raise RunDirBusy(f"{self.path} is in use: a rank of another extraction still runs "
                                 f"({_describe_holder(previous)}); wait for it, or use another --output_dir")
            _unlock(fd, 1, 0)
            if not _try_lock(fd, 1, 1, self.lock_path):
                raise RunDirBusy(f"{self.path} is in use by another extraction; use another --output_dir")
            if previous and previous.get("run_id") != run_id and not previous.get("released"):
                log.warning("taking over %s: the job that held it (%s) is gone", self.lock_path,
                            _describe_holder(previous))
            info = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                    "started": datetime.now(timezone.utc).isoformat()}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
                os.fsync(fd)
            except OSError as exc:
                raise RunDirError(f"cannot write {self.lock_path}: {exc.strerror or exc}") from None
        except BaseException:
            os.close(fd)
            raise
        self._remove_leftover_temps()
        return Lock(self.lock_path, fd, [0, 1])

    def join(self, rank: int, run_id: str) -> Lock:
        """Hold rank ``rank``'s share of the lock for job ``run_id`` (ranks other than 0)."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR)
        except OSError as exc:
            raise RunDirError(f"cannot open {self.lock_path}: {exc.strerror or exc}") from None
        try:
            holder = _read_fd(fd)
            if holder.get("run_id") != run_id:
                raise RunDirBusy(f"{self.path} is held by another extraction ({_describe_holder(holder)}), "
                                 f"not by this job's rank 0 (run {run_id})")
            if not _try_lock(fd, 1 + rank, 1, self.lock_path):
                raise RunDirBusy(f"{self.path}: rank {rank} of another extraction still runs; "
                                 "use another --output_dir")
        except BaseException:
            os.close(fd)
            raise
        return Lock(self.lock_path, fd, [1 + rank])

    def release(self, lock: Lock) -> None:
        """Release at the end of a job: marked released, so the next job does not call it stale."""
        if lock.fd is not None and 0 in lock.offsets:
            try:
                info = dict(lock.content(), released=datetime.now(timezone.utc).isoformat())
                data = json.dumps(info).encode("utf-8")
                os.ftruncate(lock.fd, 0)
                os.pwrite(lock.fd, data, 0)
            except OSError:
                pass
        lock.release()

    def _remove_leftover_temps(self) -> None:
        """Temp files and dirs of killed processes (ours by name) go when a job takes the dir."""
        remove_temp_files(self.path)
        for rank in self.ranks():
            remove_temp_files(self.rank_dir(rank))
            remove_temp_files(self.rank_dir(rank) / PARTS)

    # --- ranks ---
    def store(self, rank: int) -> "RankStore":
        return RankStore(self.path, rank)

    def remove_rank(self, rank: int) -> None:
        shutil.rmtree(self.rank_dir(rank), ignore_errors=True)

    def read_metadata(self, rank: int) -> Optional[dict]:
        try:
            return read_json(self.rank_dir(rank) / METADATA)
        except (OSError, ValueError):
            return None

    def check_rank_outputs(self, rank: int, meta: dict) -> str:
        """'' when a complete rank's final files are there and readable, else what is wrong."""
        path = self.rank_dir(rank) / EMBEDDINGS
        if not path.is_file():
            return f"{path} is missing"
        try:
            keys, matrix, failures = read_embeddings_npz(path)
        except Exception as exc:  # a damaged zip raises several kinds of errors
            return f"{path} is unreadable ({type(exc).__name__}: {exc})"
        counts = meta.get("counts") or {}
        if len(keys) != counts.get("embedded") or len(failures) != counts.get("failed") or \
                matrix.shape[0] != len(keys):
            return f"{path} disagrees with {METADATA} ({len(keys)} embedded, {len(failures)} failed)"
        return ""

    def missing_rank_pickles(self, rank: int) -> List[str]:
        """The seed's per-rank pickles a complete rank lacks (they are rebuilt from its npz)."""
        return [name for name in RANK_PICKLES if not (self.rank_dir(rank) / name).is_file()]

    def rank_embeddings_path(self, rank: int) -> Path:
        """A complete rank's npz (keys, embeddings, failures, extra; no pickle)."""
        return self.rank_dir(rank) / EMBEDDINGS

    def read_rank_results(self, rank: int):
        """(keys, matrix, failures, extra) of a complete rank."""
        path = self.rank_dir(rank) / EMBEDDINGS
        keys, matrix, failures = read_embeddings_npz(path)
        return keys, matrix, failures, read_extra(path)

    def run_ids(self) -> List[str]:
        """The run ids that wrote this dir's ranks (sorted); a rank without one counts as ''."""
        return sorted({(self.read_metadata(r) or {}).get("run_id") or "" for r in self.ranks()})

    # --- clean-up ---
    def pipeline_entries(self) -> Tuple[List[Path], List[Path]]:
        """(files, dirs) under the run dir that the pipeline writes, by known name; dirs deepest first."""
        def plain_files(folder: Path, keep) -> List[Path]:
            return [p for p in folder.iterdir()
                    if (keep(p.name) or is_temp_name(p.name)) and p.is_file() and not p.is_symlink()]

        files = plain_files(self.path, lambda name: name in (SCAN, READY, LOCK))
        dirs = []
        for rank in self.ranks():
            rank_dir = self.rank_dir(rank)
            if rank_dir.is_symlink():
                continue
            files += plain_files(rank_dir, lambda name: name in (METADATA, EMBEDDINGS, *RANK_PICKLES))
            for sub, pattern in ((PARTS, _PART), (JOURNAL, re.compile(r"\d+"))):
                folder = rank_dir / sub
                if folder.is_dir() and not folder.is_symlink():
                    files += plain_files(folder, pattern.fullmatch)
                    dirs.append(folder)
            dirs.append(rank_dir)
        return files, dirs


# --- one rank's results ---------------------------------------------------------------------
def embedding_arrays(keys: List[str], embeddings: List[np.ndarray], dim: Optional[int] = None):
    keys_array = np.array(keys, dtype=str) if keys else np.zeros(0, dtype="<U1")
    if embeddings:
        matrix = np.stack(embeddings).astype(np.float32)
    else:
        matrix = np.zeros((0, dim or 0), dtype=np.float32)
    return keys_array, matrix


def read_embeddings_npz(path: Path) -> Tuple[List[str], np.ndarray, List[dict]]:
    with np.load(path, allow_pickle=False) as data:
        keys = [str(k) for k in data["keys"]]
        matrix = data["embeddings"].astype(np.float32)
        failures = json.loads(str(data["failures"])) if "failures" in data.files else []
    return keys, matrix, failures


def read_extra(path: Path) -> Dict[str, dict]:
    with np.load(path, allow_pickle=False) as data:
        return json.loads(str(data["extra"])) if "extra" in data.files else {}


class RankStore:
    """Append-only store of one rank's results, flushed in atomic parts."""

    def __init__(self, output_dir: Path, rank: int):
        self.dir = Path(output_dir) / rank_dir_name(rank)
        self.parts_dir = self.dir / PARTS
        self.metadata_path = self.dir / METADATA
        self.keys: List[str] = []
        self.embeddings: List[np.ndarray] = []
        self.failures: List[dict] = []
        self.extra: Dict[str, dict] = {}   # per-utterance info recorded at embedding time
        self._pending = 0
        self._flushed_keys = 0       # entries below these indices are on disk already
        self._flushed_failures = 0
        self._part_index = 0
        self._last_flush = time.monotonic()

    # --- state on disk -------------------------------------------------------------------
    def read_metadata(self) -> Optional[dict]:
        try:
            return read_json(self.metadata_path)
        except (OSError, ValueError):
            return None

    def write_metadata(self, metadata: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.metadata_path, metadata)

    def wipe(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def load_parts(self) -> None:
        """Load what earlier (possibly killed) runs flushed; leftover temp files are ignored."""
        if not self.parts_dir.is_dir():
            return
        for part in sorted(self.parts_dir.glob("part_*.npz")):
            self._part_index = max(self._part_index, int(part.stem.split("_")[1]))
            try:
                keys, matrix, failures = read_embeddings_npz(part)
                extra = read_extra(part)
            except Exception as exc:  # parts are renamed into place whole; this is a storage fault
                log.warning("%s is damaged (%s): its utterances will be redone", part, exc)
                os.replace(part, part.with_name(part.name + ".damaged"))
                continue
            self.keys.extend(keys)
            self.embeddings.extend(matrix)
            self.failures.extend(failures)
            self.extra.update(extra)
        self._flushed_keys = len(self.keys)
        self._flushed_failures = len(self.failures)

    def load_final(self) -> None:
        """Load a complete rank's results from its npz (to rewrite its other final files)."""
        path = self.dir / EMBEDDINGS
        keys, matrix, failures = read_embeddings_npz(path)
        self.keys, self.embeddings, self.failures = keys, list(matrix), failures
        self.extra = read_extra(path)
        self._flushed_keys, self._flushed_failures, self._pending = len(self.keys), len(self.failures), 0

    def done_keys(self) -> set:
        return set(self.keys) | {f["key"] for f in self.failures}

    # --- appending -----------------------------------------------------------------------
    def add(self, key: str, embedding: np.ndarray, extra: Optional[dict] = None) -> None:
        if extra:
            self.extra[key] = extra
        self.embeddings.append(embedding)
        self.keys.append(key)  # last: an interrupted add leaves at most an extra embedding (repair)
        self._pending += 1

    def repair(self) -> None:
        """Undo a half-done ``add`` (an exception raised asynchronously, e.g. from a signal handler)."""
        del self.embeddings[len(self.keys):]

    def fail(self, failure: dict) -> None:
        self.failures.append(failure)
        self._pending += 1

    def maybe_flush(self, every: int, seconds: float) -> None:
        if self._pending and (self._pending >= every or time.monotonic() - self._last_flush >= seconds):
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        new_keys = self.keys[self._flushed_keys:]
        new_failures = self.failures[self._flushed_failures:]
        keys, matrix = embedding_arrays(new_keys, self.embeddings[self._flushed_keys:])
        self._part_index += 1
        atomic_write_npz(self.parts_dir / f"part_{self._part_index:06d}.npz", keys=keys, embeddings=matrix,
                         failures=np.array(json.dumps(new_failures, ensure_ascii=False)),
                         extra=np.array(json.dumps({k: self.extra[k] for k in new_keys if k in self.extra},
                                                   ensure_ascii=False)))
        self._flushed_keys = len(self.keys)
        self._flushed_failures = len(self.failures)
        self._pending = 0
        self._last_flush = time.monotonic()

    # --- completion ----------------------------------------------------------------------
    def finalize(self, utterances: Dict[str, "object"], metadata: dict) -> None:
        """Write the rank's final files, then mark it complete and drop the parts."""
        keys, matrix = embedding_arrays(self.keys, self.embeddings, metadata.get("embedding_dimension"))
        atomic_write_npz(self.dir / EMBEDDINGS, keys=keys, embeddings=matrix,
                         failures=np.array(json.dumps(self.failures, ensure_ascii=False)),
                         extra=np.array(json.dumps(self.extra, ensure_ascii=False)))
        per_utt, per_spk = {}, {}
        for key, emb in zip(self.keys, self.embeddings):
            utt = utterances[key]
            per_utt[key] = {"embedding": emb, "dataset": utt.dataset, "speaker_id": utt.speaker,
                            "utterance_id": utt.utterance, "path": utt.path}
            per_spk.setdefault(utt.speaker_key, []).append(key)
        speakers = {}
        for spk_key, members in sorted(per_spk.items()):
            first = per_utt[members[0]]
            mean = np.mean(np.stack([per_utt[k]["embedding"] for k in members]).astype(np.float64), axis=0)
            speakers[spk_key] = {"embedding": mean.astype(np.float32), "dataset": first["dataset"],
                                 "speaker_id": first["speaker_id"], "num_utterances": len(members)}
        atomic_write_pickle(self.dir / RANK_PICKLES[0], dict(sorted(per_utt.items())))
        atomic_write_pickle(self.dir / RANK_PICKLES[1], speakers)
        atomic_write_json(self.metadata_path, metadata)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
