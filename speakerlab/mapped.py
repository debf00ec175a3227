"""A final dir's npy set, memory-mapped: an EmbeddingSet that opens in constant time and memory.

``load_embeddings`` returns a ``MappedEmbeddingSet`` for a dir with the npy set (the files
``merge_embeddings.py --formats npy`` writes): the utterance matrix is mapped, never read whole;
an utterance key is found by bisection over the sorted ``utterance_list.jsonl`` (through the line
offsets of ``utterance_index.npy``, which also gives each row's speaker row); ``similar()``,
``by_dataset()`` and the speaker look-ups run over blocks of rows. Only the speaker table
(speakers x D) is held in memory, and only once a speaker-level call needs it.

Same interface as ``api.EmbeddingSet`` (``similar``, ``similar_speakers``, ``score``, ``embedding``,
``by_dataset``, ``by_speaker``, ``filter``, ``matrix``, ``utterances``, ``speakers``, ``model``);
``keys`` and ``utterances`` are lazy views that read records on demand.
"""
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from speakerlab.npyfile import MappedNpy

BLOCK_ROWS = 1 << 13  # 6 MB of 192-d rows: read, normalised and scored while in cache


SIMILAR_THREADS = min(4, os.cpu_count() or 1)  # similar() scans this many row ranges at once


def _unit(matrix) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float32)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=-1, keepdims=True), 1e-12)


def _cosines(block: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """Cosines of a block's rows to a unit vector, without a normalised copy of the block (one
    product and one sum of squares instead of three passes over it). einsum, not BLAS: it runs on
    the calling thread only, so the threads of ``similar`` do not each start BLAS's own threads
    (oversubscribed, a 6 MB block took 7-10 ms instead of 1 on a busy 2-core machine)."""
    norms = np.sqrt(np.einsum("ij,ij->i", block, block))
    return np.einsum("ij,j->i", block, unit) / np.maximum(norms, 1e-12)


def _split(count: int, parts: int) -> List[Tuple[int, int]]:
    """Up to ``parts`` contiguous ranges of ``count`` rows, on block bounds, none empty."""
    blocks = -(-count // BLOCK_ROWS)
    parts = max(1, min(parts, blocks))
    bounds = [min(count, (blocks * i // parts) * BLOCK_ROWS) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a] or [(0, count)]


class _Lines:
    """Records of a JSON-lines file by row, through their byte offsets."""

    def __init__(self, path: Path, offsets):
        self.path = Path(path)
        self.offsets = offsets
        self._handle = open(self.path, "rb")

    def line(self, row: int) -> bytes:
        self._handle.seek(int(self.offsets[row]))
        return self._handle.readline()

    def record(self, row: int) -> dict:
        return json.loads(self.line(row))

    def key(self, row: int) -> str:
        return self.record(row)["key"]

    def find(self, key: str, count: int) -> Optional[int]:
        """Row of ``key`` (lines are sorted by key), or None."""
        lo, hi = 0, count
        while lo < hi:
            mid = (lo + hi) // 2
            if self.key(mid) < key:
                lo = mid + 1
            else:
                hi = mid
        return lo if lo < count and self.key(lo) == key else None

    def close(self) -> None:
        self._handle.close()


class _Keys(Sequence):
    """The utterance keys of a mapped set, read on demand (iterating streams the file)."""

    def __init__(self, owner: "MappedEmbeddingSet"):
        self._owner = owner

    def __len__(self) -> int:
        return len(self._owner)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._owner._lines.key(int(self._owner._rows_of([i])[0]))

    def __iter__(self):
        for row, record in self._owner._records():
            yield record["key"]

    def __contains__(self, key) -> bool:
        return key in self._owner


class _Utterances(Mapping):
    """key -> record with its embedding, read on demand."""

    def __init__(self, owner: "MappedEmbeddingSet"):
        self._owner = owner

    def __getitem__(self, key):
        row = self._owner._row(key)
        if row is None:
            raise KeyError(key)
        return dict(self._owner._lines.record(row), embedding=np.array(self._owner._matrix.array[row]))

    def __iter__(self):
        return iter(self._owner.keys)

    def __len__(self) -> int:
        return len(self._owner)


class MappedEmbeddingSet:
    """The npy set of a final dir (or a subset of its rows)."""

    def __init__(self, directory: Path, files: Dict[str, str], summary: Optional[dict] = None,
                 rows: Optional[np.ndarray] = None, parent: Optional["MappedEmbeddingSet"] = None):
        self.directory = Path(directory)
        self.summary = summary or {}
        self._files = files
        if parent is None:
            self._matrix = MappedNpy(self.directory / files["matrix"])
            self._index = MappedNpy(self.directory / files["index"])
            if self._index.shape != (len(self._matrix), 2):
                raise ValueError(f"{self.directory / files['index']} does not match {files['matrix']} "
                                 f"({self._index.shape[0]} rows, {len(self._matrix)} embeddings)")
            self._lines = _Lines(self.directory / files["jsonl"], self._index.array[:, 0])
            self._speaker_state = None
        else:
            self._matrix, self._index, self._lines = parent._matrix, parent._index, parent._lines
            self._speaker_state = parent._speaker_state
        self._parent = parent
        self._rows = None if rows is None else np.asarray(rows, dtype=np.int64)  # None: every row
        self._model = parent._model if parent is not None else None

    # --- size and rows ---
    def __len__(self) -> int:
        return len(self._matrix) if self._rows is None else len(self._rows)

    @property
    def dim(self) -> int:
        return int(self._matrix.shape[1]) if len(self._matrix.shape) == 2 else 0

    def __repr__(self) -> str:
        return (f"MappedEmbeddingSet({len(self)} utterances, {len(self.speaker_keys)} speakers, "
                f"dim {self.dim}, from {self.directory})")

    def _rows_of(self, positions) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        return positions if self._rows is None else self._rows[positions]

    def _row(self, key) -> Optional[int]:
        """Row (in the whole dir) of an utterance key of this set, or None."""
        row = self._lines.find(str(key), len(self._matrix))
        if row is None or (self._rows is not None and not _member(self._rows, row)):
            return None
        return row

    def __contains__(self, key) -> bool:
        return self._row(key) is not None

    def __getitem__(self, key: str) -> dict:
        return self.utterances[key]

    def _blocks(self, columns=False, embeddings=True, start: int = 0, stop: Optional[int] = None):
        """(positions in this set, rows of the dir, embeddings[, index columns]) a block at a time,
        for positions ``start:stop``; the whole dir's blocks are read with positioned file reads into
        one buffer (no mapped pages; safe from several threads at once)."""
        stop = len(self) if stop is None else min(stop, len(self))
        buffer = np.empty((BLOCK_ROWS, self.dim), np.float32) if self._rows is None and embeddings else None
        for first in range(start, stop, BLOCK_ROWS):
            positions = np.arange(first, min(stop, first + BLOCK_ROWS))
            if self._rows is None:
                rows = positions
                block = self._matrix.read(first, first + len(positions), buffer) if embeddings else None
                index = self._index.read(first, first + len(positions)) if columns else None
            else:
                rows = self._rows[positions]
                block = self._matrix.take(rows) if embeddings else None
                index = self._index.take(rows) if columns else None
            yield positions, rows, block, index

    def _records(self):
        """(row, record) for every row of this set, in order (streams the .jsonl)."""
        if self._rows is None:
            with open(self._lines.path, "rb") as handle:
                for row, line in enumerate(handle):
                    yield row, json.loads(line)
        else:
            for row in self._rows.tolist():
                yield row, self._lines.record(row)

    # --- views ---
    @property
    def keys(self) -> _Keys:
        return _Keys(self)

    @property
    def utterances(self) -> _Utterances:
        return _Utterances(self)

    def _speakers_loaded(self):
        if self._speaker_state is None:
            records = []
            with open(self.directory / self._files["speaker_jsonl"], encoding="utf-8") as handle:
                for line in handle:
                    records.append(json.loads(line))
            matrix = np.load(self.directory / self._files["speaker_matrix"], allow_pickle=False)
            if len(matrix) != len(records):
                raise ValueError(f"{self.directory}: {self._files['speaker_matrix']} and "
                                 f"{self._files['speaker_jsonl']} disagree ({len(matrix)} vs {len(records)} rows)")
            self._speaker_state = {"records": records, "matrix": np.asarray(matrix, np.float32),
                                   "index": {r["key"]: i for i, r in enumerate(records)}}
            root = self._parent
            while root is not None:
                root._speaker_state = self._speaker_state
                root = root._parent
        return self._speaker_state

    def _speaker_rows(self) -> np.ndarray:
        """The dir's speaker rows that have utterances in this set."""
        if self._rows is None:
            return np.arange(len(self._speakers_loaded()["records"]))
        found = np.zeros(len(self._speakers_loaded()["records"]), dtype=bool)
        for first in range(0, len(self._rows), BLOCK_ROWS):
            found[self._index.take(self._rows[first:first + BLOCK_ROWS])[:, 1]] = True
        return np.flatnonzero(found)

    @property
    def speaker_keys(self) -> List[str]:
        records = self._speakers_loaded()["records"]
        return [records[i]["key"] for i in self._speaker_rows()]

    @property
    def speakers(self) -> Dict[str, dict]:
        state = self._speakers_loaded()
        return {state["records"][i]["key"]: dict(state["records"][i], embedding=state["matrix"][i])
                for i in self._speaker_rows()}

    @property
    def datasets(self) -> List[str]:
        records = self._speakers_loaded()["records"]
        return sorted({records[i]["dataset"] for i in self._speaker_rows()})

    def speaker_of(self, key: str) -> str:
        row = self._row(key)
        if row is None:
            raise KeyError(key)
        return self._speakers_loaded()["records"][int(self._index.array[row, 1])]["key"]

    def matrix(self, level: str = "utterance", normalize: bool = False):
        """(keys, matrix). Utterances of the whole dir: the mapped array itself (read-only, nothing
        loaded); of a subset, or normalised: an array in memory."""
        if level == "speaker":
            state = self._speakers_loaded()
            rows = self._speaker_rows()
            matrix = state["matrix"][rows]
            return [state["records"][i]["key"] for i in rows], (_unit(matrix) if normalize else matrix.copy())
        if level != "utterance":
            raise ValueError("level must be 'utterance' or 'speaker'")
        if self._rows is None and not normalize:
            return self.keys, self._matrix.array
        matrix = np.concatenate([b.copy() for _, _, b, _ in self._blocks()]) if len(self) else \
            np.zeros((0, self.dim), np.float32)
        return self.keys, (_unit(matrix) if normalize else matrix)

    # --- queries ---
    def _resolve(self, query):
        """-> (vector, row of the utterance or None, speaker row or None)."""
        if isinstance(query, (str, os.PathLike)):
            text = str(query)
            row = self._row(text)
            if row is not None:
                return np.array(self._matrix.array[row]), row, int(self._index.array[row, 1])
            state = self._speakers_loaded()
            if text in state["index"]:
                s = state["index"][text]
                return state["matrix"][s], None, s
            if os.path.isfile(text):
                found = self.find_path(text)
                if found is not None:
                    return self._resolve(found)
                return self.model().embed(text), None, None
            raise KeyError(f"{text!r} is not an utterance key, a speaker key or an audio file of this set")
        from speakerlab.vectors import query_vector
        return query_vector(query, self.dim), None, None

    def find_path(self, path) -> Optional[str]:
        """Utterance key of an audio file of this set (reads the list: linear in the set's size)."""
        text, real = str(path), os.path.realpath(str(path))
        for _, record in self._records():
            if record.get("start") is None and (text in (record.get("path"), record.get("rel_path")) or
                                                 real == os.path.realpath(record.get("path") or "")):
                return record["key"]
        return None

    def embedding(self, query) -> np.ndarray:
        return self._resolve(query)[0]

    def score(self, a, b) -> float:
        from speakerlab.vectors import cosine
        return cosine(self.embedding(a), self.embedding(b))

    def similar(self, query, k: int = 10, same_speaker: Optional[bool] = None):
        """Top-k utterances by cosine to ``query``, over blocks of rows (see api.EmbeddingSet.similar).

        The rows are split into up to ``SIMILAR_THREADS`` contiguous ranges scanned by threads at
        once (file reads and BLAS release the GIL), each keeping its own top k; a block's rows are
        scored only against the running k-th best, so the top-k upkeep costs almost nothing."""
        from speakerlab.vectors import Match
        vector, own_row, speaker = self._resolve(query)
        if same_speaker is not None and speaker is None:
            raise ValueError("same_speaker needs a query from this set (utterance key, speaker key or its path)")
        if k <= 0:
            return []
        unit = _unit(vector).astype(np.float32)
        columns = same_speaker is not None

        def scan(first: int, stop: int):
            best_scores, best_rows = np.zeros(0, np.float32), np.zeros(0, np.int64)
            floor = -np.inf
            for _, rows, block, index in self._blocks(columns=columns, start=first, stop=stop):
                scores = _cosines(block, unit)
                keep = scores >= floor
                if own_row is not None and rows[0] <= own_row <= rows[-1]:
                    keep &= rows != own_row
                if columns:
                    mine = index[:, 1] == speaker
                    keep &= mine if same_speaker else ~mine
                candidates = np.flatnonzero(keep)
                if not len(candidates):
                    continue
                if len(candidates) > k:  # this block's top k (ties at the cut kept, settled below by row)
                    cut = np.partition(scores[candidates], len(candidates) - k)[len(candidates) - k]
                    candidates = candidates[scores[candidates] >= cut]
                best_scores = np.concatenate([best_scores, scores[candidates]])
                best_rows = np.concatenate([best_rows, rows[candidates]])
                order = np.lexsort((best_rows, -best_scores))[:k]
                best_scores, best_rows = best_scores[order], best_rows[order]
                if len(best_scores) == k:
                    floor = best_scores[-1]
            return best_scores, best_rows

        parts = _split(len(self), SIMILAR_THREADS)
        if len(parts) == 1:
            found = [scan(*parts[0])]
        else:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(len(parts)) as pool:
                found = list(pool.map(lambda part: scan(*part), parts))
        scores = np.concatenate([f[0] for f in found])
        rows = np.concatenate([f[1] for f in found])
        order = np.lexsort((rows, -scores))[:k]
        return [Match(self._lines.key(int(r)), float(s)) for r, s in zip(rows[order], scores[order])]

    def similar_speakers(self, query, k: int = 10):
        from speakerlab.vectors import top as _top
        vector, _, speaker = self._resolve(query)
        state = self._speakers_loaded()
        rows = self._speaker_rows()
        scores = _unit(state["matrix"][rows]) @ _unit(vector)
        keep = rows != speaker if speaker is not None else np.ones(len(rows), dtype=bool)
        return _top([state["records"][i]["key"] for i in rows], scores, keep, k)

    # --- subsets ---
    def _subset(self, rows: np.ndarray) -> "MappedEmbeddingSet":
        return MappedEmbeddingSet(self.directory, self._files, self.summary, np.asarray(rows, np.int64), self)

    def _rows_with_speakers(self, wanted: np.ndarray) -> np.ndarray:
        found = []
        for positions, rows, _, index in self._blocks(columns=True, embeddings=False):
            found.append(rows[wanted[index[:, 1]]])
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    def by_dataset(self, *names: str) -> "MappedEmbeddingSet":
        datasets = self.datasets
        unknown = [n for n in names if n not in datasets]
        if unknown or not names:
            raise KeyError(f"no dataset {', '.join(map(repr, unknown)) or '(none given)'}; "
                           f"datasets: {', '.join(datasets)}")
        records = self._speakers_loaded()["records"]
        wanted = np.array([r["dataset"] in names for r in records], dtype=bool)
        return self._subset(self._rows_with_speakers(wanted))

    def by_speaker(self, *speakers: str, dataset: Optional[str] = None) -> "MappedEmbeddingSet":
        if not speakers:
            raise KeyError("name at least one speaker")
        records = self._speakers_loaded()["records"]
        present = set(self._speaker_rows().tolist())
        wanted = np.zeros(len(records), dtype=bool)
        for name in speakers:
            found = [i for i in present if (records[i]["key"] == name or records[i]["speaker_id"] == name)
                     and (dataset is None or records[i]["dataset"] == dataset)]
            if not found:
                close = [records[i]["key"] for i in sorted(present) if name in records[i]["key"]][:5]
                raise KeyError(f"no speaker {name!r}" + (f" in dataset {dataset!r}" if dataset else "")
                               + (f"; did you mean {', '.join(close)}?" if close else ""))
            wanted[found] = True
        return self._subset(self._rows_with_speakers(wanted))

    def filter(self, predicate) -> "MappedEmbeddingSet":
        """The utterances whose record satisfies ``predicate`` (reads every record of the set)."""
        return self._subset(np.array([row for row, record in self._records() if predicate(record)], dtype=np.int64))

    def model(self, device=None, dtype: Optional[str] = None):
        """The model that made this set (``speakerlab.load_embeddings`` gives the set the means)."""
        root = self
        while root._parent is not None:
            root = root._parent
        factory = getattr(root, "model_factory", None)
        if factory is None:
            raise ValueError("open the dir with speakerlab.load_embeddings to embed new audio with its model")
        return factory(device, dtype)

    def close(self) -> None:
        if self._parent is None:
            self._matrix.close()
            self._index.close()
            self._lines.close()


def _member(sorted_rows: np.ndarray, row: int) -> bool:
    i = int(np.searchsorted(sorted_rows, row))
    return i < len(sorted_rows) and sorted_rows[i] == row
