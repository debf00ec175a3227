"""The intermediate (run) dir of an extraction: the only code that knows its files.

Layout of ``output_dir``::

    extract.lock                   the lock: {run_id, host, pid, started} of the job holding the dir;
                                   byte 0 is held (POSIX lock) by that job's rank 0, byte 1 + r by its rank r
    scan.npz                       the utterance list in columns (scanfile.py), written once by rank 0 when the
                                   scan is complete, cut into contiguous shards; each rank reads its rows
    scan.walk.npz, scan.headers_XX.npz   while the ranks share the header reads (then removed)
    scan.ready.json                rank 0's scan outcome for ranks without a process group (srun)
    rank_00/metadata.json          fingerprint, run id, host and pid, counts, the complete flag
    rank_00/parts/part_000001.npz  flushed work: keys, embeddings, failures (no pickle)
    rank_00/decoding/<pid>         the decode journal: the file each decode worker is on
    rank_00/embeddings.npz         all of the rank's embeddings in scan order, written from the parts a block
                                   at a time (rankout.py; members stored, so merge maps them)
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
from speakerlab import scanfile
from speakerlab.store import (atomic_write_json, atomic_write_npz, is_temp_name, read_json,
                              remove_temp_files)

log = logging.getLogger("speakerlab")

SCAN = "scan.npz"
WALK = "scan.walk.npz"          # the walked files before their headers are read (shared header reads)
HEADERS = "scan.headers"        # + _XX.npz: rank XX's share of the header reads
READY = "scan.ready.json"
LOCK = "extract.lock"
CLEANUP = "cleanup.json"   # clean-up's verified run ids: a clean-up killed half way can be rerun
METADATA = "metadata.json"
EMBEDDINGS = "embeddings.npz"
RANK_PICKLES = ("utterance_embeddings.pkl", "speaker_embeddings.pkl")
PARTS = "parts"
JOURNAL = "decoding"
_RANK_DIR = re.compile(r"rank_(\d+)")
_PART = re.compile(r"part_\d{6}\.npz(\.damaged)?")
_HEADER_FILE = re.compile(re.escape(HEADERS) + r"_\d+\.(npz|claim)")


class RunDirError(Exception):
    """The run dir cannot be used as it is (unreadable, unwritable, made by another run): one line."""


class RunDirBusy(RunDirError):
    """Another live job holds the run dir."""


def _metadata_or_none(meta) -> Optional[dict]:
    """A rank's metadata as read, or None (unreadable) when it is valid JSON of the wrong shape."""
    if not isinstance(meta, dict) or not isinstance(meta.get("run_id") or "", str):
        return None
    if any(not isinstance(meta.get(name) or {}, dict) for name in ("fingerprint", "counts")):
        return None
    fingerprint = meta.get("fingerprint")
    if fingerprint and "dtype" in fingerprint and "backend" not in fingerprint:
        # written before the backend joined the fingerprint: its engine record says which one ran
        # (torch, unless OpenVINO was asked for), so such a rank still resumes and merges
        engine = meta.get("engine") if isinstance(meta.get("engine"), dict) else {}
        fingerprint["backend"] = engine.get("backend") or "torch"
    return meta


def rank_dir_name(rank: int) -> str:
    return f"rank_{rank:02d}"


def new_run_id(job: Optional[str] = None) -> str:
    """A fresh run id; ``job`` (a Slurm job/step or $SPEAKERLAB_RUN_ID) prefixes it when given."""
    stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    return f"{job}-{stamp}" if job else stamp


keys_digest = data_mod.keys_digest


def scan_fingerprint(scan: data_mod.ScanResult) -> dict:
    """What a rank's results depend on in the scan (of the whole scan, also when ``scan`` holds one
    rank's shard: its file's record says); merge checks ranks against the scan beside them."""
    if scan.meta.get("keys_sha1"):
        return {"data_root": scan.data_root, "source": scan.source, "num_utterances": int(scan.meta["count"]),
                "keys_sha1": scan.meta["keys_sha1"]}
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
    def _unreadable(self, path: Path, exc: Exception) -> RunDirError:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        return RunDirError(f"{path} is unreadable ({reason}); it was cut short or damaged: "
                           "rerun with --overwrite to scan again")

    def load_scan(self) -> data_mod.ScanResult:
        """The whole scan (every row in memory)."""
        try:
            return scanfile.load(self.scan_path)
        except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
            raise self._unreadable(self.scan_path, exc) from None

    def open_scan(self, path: Optional[Path] = None) -> "scanfile.ScanFile":
        """The scan file, open: its record at once, rows on demand (``rows``, ``shard``)."""
        path = path or self.scan_path
        try:
            return scanfile.ScanFile(path)
        except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
            raise self._unreadable(path, exc) from None

    def load_shard(self, rank: int, world: int) -> data_mod.ScanResult:
        """Rank ``rank``'s rows of the scan, with the record of the whole scan (``meta``)."""
        with self.open_scan() as handle:
            try:
                return handle.shard(rank, world)
            except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
                raise self._unreadable(self.scan_path, exc) from None

    def save_scan(self, scan: data_mod.ScanResult, world: Optional[int] = None) -> dict:
        """Write the scan file whole or not at all, cut into contiguous shards for ``world`` ranks
        (``data.shard_bounds``); returns its record."""
        tmp = self.path / f".scan.tmp{os.getpid()}"
        try:
            tmp.mkdir(exist_ok=True)
            shard = None
            if world is not None:
                shard = (world, data_mod.shard_bounds([u.duration for u in scan.utterances], world))
            meta = scanfile.save(scan, tmp / SCAN, shard=shard)
            os.replace(tmp / SCAN, self.scan_path)
            return meta
        except OSError as exc:  # named by the file it was writing, not by the temp dir
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.scan_path)) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def remove_scan(self) -> None:
        self.scan_path.unlink(missing_ok=True)

    # --- header reads shared by the ranks ---
    @property
    def walk_path(self) -> Path:
        return self.path / WALK

    def header_path(self, rank: int) -> Path:
        return self.path / f"{HEADERS}_{rank:02d}.npz"

    def claim_path(self, rank: int) -> Path:
        """Created (exclusively) by whoever reads slice ``rank`` of the headers."""
        return self.path / f"{HEADERS}_{rank:02d}.claim"

    def save_walk(self, scan: data_mod.ScanResult) -> None:
        """The walked files (no headers yet), for the ranks to share the header reads."""
        try:
            scanfile.save(scan, self.walk_path, headers_read=False, compress=False)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.walk_path)) from None

    def remove_walk(self) -> None:
        """The walk and every header and claim file (of this job, or left by an earlier one)."""
        self.walk_path.unlink(missing_ok=True)
        for entry in self.path.iterdir():
            if _HEADER_FILE.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
                entry.unlink(missing_ok=True)

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
            return _metadata_or_none(read_json(self.rank_dir(rank) / METADATA))
        except (OSError, ValueError):
            return None

    def check_rank_outputs(self, rank: int, meta: dict) -> str:
        """'' when a complete rank's final files are there and readable, else what is wrong (reads
        the npz's table of contents and its failures, not its embeddings)."""
        path = self.rank_dir(rank) / EMBEDDINGS
        if not path.is_file():
            return f"{path} is missing"
        try:
            from speakerlab.npyfile import MappedNpy
            with np.load(path, allow_pickle=False) as data:
                failures = json.loads(str(data["failures"])) if "failures" in data.files else []
                members = set(data.files)
            shapes = {}
            for name in ("keys", "embeddings", "rows"):
                if name in members:
                    mapped = MappedNpy.member(path, name)
                    shapes[name] = mapped.shape
                    mapped.close()
        except Exception as exc:  # a damaged zip raises several kinds of errors
            return f"{path} is unreadable ({type(exc).__name__}: {exc})"
        counts = meta.get("counts") or {}
        embedded = shapes.get("keys", (None,))[0]
        if embedded != counts.get("embedded") or len(failures) != counts.get("failed") or \
                shapes.get("embeddings", (None,))[0] != embedded or shapes.get("rows", (embedded,))[0] != embedded:
            return f"{path} disagrees with {METADATA} ({embedded} embedded, {len(failures)} failed)"
        return ""

    def missing_rank_pickles(self, rank: int) -> List[str]:
        """The seed's per-rank pickles a complete rank lacks (they are rebuilt from its npz)."""
        return [name for name in RANK_PICKLES if not (self.rank_dir(rank) / name).is_file()]

    def rank_embeddings_path(self, rank: int) -> Path:
        """A complete rank's npz (keys, scan rows, embeddings, seconds, chunks, failures; no pickle)."""
        return self.rank_dir(rank) / EMBEDDINGS

    def read_rank_results(self, rank: int, row_of=None):
        """A complete rank's results as ``streammerge.RankResults`` (members mapped, nothing loaded);
        ``row_of(keys)`` -> {key: scan row} is needed only for an npz of an earlier version."""
        from speakerlab import rankout
        return rankout.read_rank_results(self.rank_dir(rank) / EMBEDDINGS, row_of)

    def read_rank_arrays(self, rank: int):
        """(keys, matrix, failures, extra) of a complete rank, in memory (the in-memory merge)."""
        path = self.rank_dir(rank) / EMBEDDINGS
        keys, matrix, failures = read_embeddings_npz(path)
        with np.load(path, allow_pickle=False) as data:
            if "seconds" in data.files:
                extra = {}
                for key, seconds, chunks in zip(keys, data["seconds"].tolist(), data["chunks"].tolist()):
                    entry = {} if seconds != seconds else {"seconds": seconds}
                    if chunks > 1:
                        entry["chunks"] = chunks
                    extra[key] = entry
            else:
                extra = json.loads(str(data["extra"])) if "extra" in data.files else {}
        return keys, matrix, failures, extra

    def run_ids(self) -> List[str]:
        """The run ids that wrote this dir's ranks (sorted); a rank without one counts as ''."""
        return sorted({(self.read_metadata(r) or {}).get("run_id") or "" for r in self.ranks()})

    # --- clean-up ---
    def read_cleanup(self) -> Optional[dict]:
        try:
            record = read_json(self.path / CLEANUP)
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def write_cleanup(self, record: dict) -> None:
        atomic_write_json(self.path / CLEANUP, record)

    def pipeline_entries(self) -> Tuple[List[Path], List[Path]]:
        """(files, dirs) under the run dir that the pipeline writes, by known name; dirs deepest first."""
        def plain_files(folder: Path, keep) -> List[Path]:
            return [p for p in folder.iterdir()
                    if (keep(p.name) or is_temp_name(p.name)) and p.is_file() and not p.is_symlink()]

        top = plain_files(self.path, lambda name: name in (SCAN, READY, LOCK, CLEANUP, WALK) or
                          bool(_HEADER_FILE.fullmatch(name)))
        files, dirs = [], []
        for rank in self.ranks():
            rank_dir = self.rank_dir(rank)
            if rank_dir.is_symlink():
                continue
            rank_files = plain_files(rank_dir, lambda name: name in (METADATA, EMBEDDINGS, *RANK_PICKLES))
            for sub, pattern in ((PARTS, _PART), (JOURNAL, re.compile(r"\d+"))):
                folder = rank_dir / sub
                if folder.is_dir() and not folder.is_symlink():
                    files += plain_files(folder, pattern.fullmatch)
                    dirs.append(folder)
            files += sorted(rank_files, key=lambda p: p.name == METADATA)  # its run id goes last
            dirs.append(rank_dir)
        # in removal order: the ranks, then the scan, the clean-up record and the lock last, so a
        # clean-up killed half way still finds what it needs to be rerun
        order = (READY, SCAN, CLEANUP, LOCK)
        return files + sorted(top, key=lambda p: order.index(p.name) if p.name in order else -1), dirs


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
    """One rank's results, flushed in atomic parts. Memory holds the part being filled, never the
    rank's embeddings nor a set of its keys (``done_keys`` reads them back from the parts): ``finalize`` writes the rank's npz from
    the parts a block at a time (``rankout``)."""

    def __init__(self, output_dir: Path, rank: int):
        self.dir = Path(output_dir) / rank_dir_name(rank)
        self.parts_dir = self.dir / PARTS
        self.metadata_path = self.dir / METADATA
        self.failures: List[dict] = []      # all of the rank's failures (they go into its metadata)
        self.embedded = 0                   # embeddings added, flushed or not
        self.dim: Optional[int] = None
        self._keys: List[str] = []          # the part being filled
        self._embeddings: List[np.ndarray] = []
        self._extra: Dict[str, dict] = {}
        self._new_failures: List[dict] = []
        self._part_index = 0
        self._last_flush = time.monotonic()

    # --- state on disk -------------------------------------------------------------------
    def read_metadata(self) -> Optional[dict]:
        try:
            return _metadata_or_none(read_json(self.metadata_path))
        except (OSError, ValueError):
            return None

    def write_metadata(self, metadata: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.metadata_path, metadata)

    def wipe(self, keep: Optional[str] = None) -> None:
        """Remove the rank's dir; ``keep``: but for that entry of it (the decode journal of workers
        started before the store was opened)."""
        if keep is None or not self.dir.is_dir():
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        for entry in self.dir.iterdir():
            if entry.name == keep:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def _parts(self) -> List[Path]:
        return sorted(self.parts_dir.glob("part_*.npz")) if self.parts_dir.is_dir() else []

    def load_parts(self) -> set:
        """Take in what earlier (possibly killed) runs flushed: counts and failures, not embeddings.
        Returns the keys done (embedded or failed), read once here for the caller's to-do list; the
        store itself keeps no set of them."""
        seen: set = set()
        for part in self._parts():
            self._part_index = max(self._part_index, int(part.stem.split("_")[1]))
            try:
                with np.load(part, allow_pickle=False) as data:
                    keys = [str(k) for k in data["keys"]]
                    dim = data["embeddings"].shape[1] if data["embeddings"].ndim == 2 else None
                    failures = json.loads(str(data["failures"])) if "failures" in data.files else []
            except Exception as exc:  # parts are renamed into place whole; this is a storage fault
                log.warning("%s is damaged (%s): its utterances will be redone", part, exc)
                os.replace(part, part.with_name(part.name + ".damaged"))
                continue
            new = [k for k in keys if k not in seen]  # a key flushed twice (a redone part) counts once
            seen.update(new)
            self.embedded += len(new)
            self.failures.extend(failures)
            if keys and dim:
                self.dim = int(dim)
        return seen | set(self._keys) | {f["key"] for f in self.failures}

    def done_keys(self) -> set:
        """Keys embedded (flushed, read back from the parts, or pending) or failed. Asked when a run
        resumes and after a decoder crash, so nothing holds a set of the shard's keys meanwhile."""
        done = set(self._keys)
        for part in self._parts():
            try:
                with np.load(part, allow_pickle=False) as data:
                    done.update(str(k) for k in data["keys"])
            except Exception:  # damaged: load_parts set it aside; its utterances are redone
                continue
        return done | {f["key"] for f in self.failures}

    # --- appending -----------------------------------------------------------------------
    def add(self, key: str, embedding: np.ndarray, extra: Optional[dict] = None) -> None:
        if extra:
            self._extra[key] = extra
        self._embeddings.append(embedding)
        self._keys.append(key)  # last: an interrupted add leaves at most an extra embedding (repair)
        self.embedded += 1
        self.dim = int(np.asarray(embedding).shape[0])

    def repair(self) -> None:
        """Undo a half-done ``add`` (an exception raised asynchronously, e.g. from a signal handler)."""
        del self._embeddings[len(self._keys):]

    def fail(self, failure: dict) -> None:
        self.failures.append(failure)
        self._new_failures.append(failure)

    @property
    def _pending(self) -> int:
        return len(self._keys) + len(self._new_failures)

    def maybe_flush(self, every: int, seconds: float) -> None:
        if self._pending and (self._pending >= every or time.monotonic() - self._last_flush >= seconds):
            self.flush()

    def flush(self) -> None:
        """Write the part being filled (atomically) and start an empty one."""
        if not self._pending:
            return
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        keys, matrix = embedding_arrays(self._keys, self._embeddings[:len(self._keys)], self.dim)
        self._part_index += 1
        atomic_write_npz(self.parts_dir / f"part_{self._part_index:06d}.npz", keys=keys, embeddings=matrix,
                         failures=np.array(json.dumps(self._new_failures, ensure_ascii=False)),
                         extra=np.array(json.dumps({k: self._extra[k] for k in self._keys if k in self._extra},
                                                   ensure_ascii=False)))
        self._keys, self._embeddings, self._extra, self._new_failures = [], [], {}, []
        self._last_flush = time.monotonic()

    # --- completion ----------------------------------------------------------------------
    def finalize(self, shard: List, metadata: dict, first_row: int = 0) -> dict:
        """Write the rank's npz from its parts (in scan-row order: ``shard`` holds the scan rows
        ``first_row:`` in key order), then its pickles, then the metadata marked with the counts;
        drop the parts. Returns the counts."""
        from speakerlab import rankout
        self.flush()
        index = rankout.ShardIndex(shard, first_row)
        written = rankout.write_rank_npz(self._parts(), index, self.dir / EMBEDDINGS, self.dim)
        metadata.update({"embedding_dimension": written["dim"] or metadata.get("embedding_dimension"),
                         "audio_seconds": round(written["audio_seconds"], 3), "failures": written["failures"]})
        metadata.setdefault("counts", {}).update({"embedded": written["embedded"], "failed": written["failed"]})
        self.rewrite_pickles(shard, index)
        atomic_write_json(self.metadata_path, metadata)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return written

    def rewrite_pickles(self, shard: List, index=None) -> None:
        """The seed's per-rank pickles, from the rank's npz (a block at a time)."""
        from speakerlab import rankout
        rankout.write_rank_pickles(self.dir / EMBEDDINGS, index or rankout.ShardIndex(shard),
                                   self.dir / RANK_PICKLES[0], self.dir / RANK_PICKLES[1])
