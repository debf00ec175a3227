"""Durable per-rank results: atomic part files, resume, fingerprints, final rank files.

Layout of ``output_dir``::

    scan.json                      the utterance list (written once by rank 0, reused on resume)
    rank_00/parts/part_000001.npz  flushed work: keys, embeddings, failures (no pickle)
    rank_00/metadata.json          fingerprint, counts, complete flag
    rank_00/embeddings.npz         all of the rank's embeddings (when complete)
    rank_00/utterance_embeddings.pkl, speaker_embeddings.pkl   the seed's per-rank pickles

Every file is written to a temporary name and renamed, so a reader never sees half a file and a
killed rank loses at most the batches since its last flush.
"""
import json
import logging
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

log = logging.getLogger("speakerlab")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, ensure_ascii=False, default=str).encode("utf-8"))


def atomic_write_pickle(path: Path, obj) -> None:
    atomic_write_bytes(path, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def atomic_write_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def read_json(path: Path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


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
        self.dir = Path(output_dir) / f"rank_{rank:02d}"
        self.parts_dir = self.dir / "parts"
        self.metadata_path = self.dir / "metadata.json"
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
        atomic_write_npz(self.dir / "embeddings.npz", keys=keys, embeddings=matrix,
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
        atomic_write_pickle(self.dir / "utterance_embeddings.pkl", dict(sorted(per_utt.items())))
        atomic_write_pickle(self.dir / "speaker_embeddings.pkl", speakers)
        atomic_write_json(self.metadata_path, metadata)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
