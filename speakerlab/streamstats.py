"""Speaker means and statistics in passes over blocks of rows: memory O(speakers x D) + a block.

The same numbers as ``stats.speaker_statistics`` / ``merge.speaker_means`` on a matrix in memory,
bit for bit: every per-speaker sum is accumulated row by row in row order (``np.add.at`` is
unbuffered and sequential, like ``np.bincount``), every per-row value comes from the same functions
of ``stats.py``, and the outlier rule runs on each speaker's scores in row order. Only the grouping
into blocks differs, and nothing depends on it.

Passes (rows are read from a ``MappedNpy`` or an array, a block at a time):
1. ``SpeakerAccumulator.add``: float64 weighted sums, weight totals and counts per speaker, and the
   first and last row of each speaker. The merge feeds it while it writes the matrix.
2. ``cosines``: each row's cosine to its speaker's centroid and to the centroid of the others
   (leave-one-out), written to scratch ``.npy`` files; per-speaker mean and minimum.
3. ``outliers``: speakers taken in groups of at most ``OUTLIER_ROWS`` rows; each group reads the
   leave-one-out scores of its row range only (rows of a speaker are nearly contiguous when rows
   are sorted by key) and applies ``stats.outlier_flags``.
"""
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from speakerlab import stats as stats_mod
from speakerlab.npyfile import MappedNpy, NpyWriter, rows_per_block

OUTLIER_ROWS = 1 << 21  # rows of leave-one-out scores held at once by the outlier pass


class ArrayRows:
    """An in-memory array with ``MappedNpy``'s reading interface."""

    def __init__(self, array):
        self.array = np.asarray(array)
        self.shape = self.array.shape

    def __len__(self) -> int:
        return len(self.array)

    def block(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]


def as_rows(source):
    return source if hasattr(source, "block") else ArrayRows(source)


class SpeakerAccumulator:
    """Pass 1: per-speaker float64 sums of (normalised, weighted) rows, fed block by block in row order."""

    def __init__(self, num_speakers: int, dim: int, rule: str = "plain", weighted: bool = False):
        self.rule, self.weighted = rule, weighted
        self.sums = np.zeros((num_speakers, dim))
        self.totals = np.zeros(num_speakers)
        self.counts = np.zeros(num_speakers, dtype=np.int64)
        self.first_row = np.full(num_speakers, np.iinfo(np.int64).max, dtype=np.int64)
        self.last_row = np.full(num_speakers, -1, dtype=np.int64)
        self.rows = 0

    def add(self, rows: np.ndarray, speaker_index: np.ndarray, weights: Optional[np.ndarray] = None) -> None:
        index = np.asarray(speaker_index, dtype=np.int64)
        part = stats_mod._rows(rows, self.rule)
        if self.weighted:
            w = np.asarray(weights, dtype=np.float64)
            part = part * w[:, None]
            np.add.at(self.totals, index, w)
        else:
            np.add.at(self.totals, index, 1.0)
        np.add.at(self.sums, index, part)
        np.add.at(self.counts, index, 1)
        positions = np.arange(self.rows, self.rows + len(index), dtype=np.int64)
        np.minimum.at(self.first_row, index, positions)
        np.maximum.at(self.last_row, index, positions)
        self.rows += len(index)

    def means(self) -> np.ndarray:
        """The speaker embeddings: exact weighted means, float32 (as ``merge.speaker_means``)."""
        if self.weighted:
            return (self.sums / self.totals[:, None]).astype(np.float32)
        return (self.sums / self.counts[:, None]).astype(np.float32)


def accumulate(rows, speaker_index, num_speakers: int, rule: str = "plain", weights=None,
               block_rows: Optional[int] = None) -> SpeakerAccumulator:
    """Pass 1 over sources (arrays or ``MappedNpy``) of rows, speaker indices and weights."""
    rows, speaker_index = as_rows(rows), as_rows(speaker_index)
    weights = as_rows(weights) if weights is not None else None
    acc = SpeakerAccumulator(num_speakers, rows.shape[1], rule, weights is not None)
    step = block_rows or rows_per_block(rows.shape[1] * 8)
    for start in range(0, len(rows), step):
        stop = min(len(rows), start + step)
        acc.add(rows.block(start, stop), speaker_index.block(start, stop),
                weights.block(start, stop) if weights is not None else None)
    return acc


def cosines(rows, speaker_index, acc: SpeakerAccumulator, scratch: Path, weights=None,
            block_rows: Optional[int] = None) -> Dict[str, object]:
    """Pass 2: ``to_centroid`` and ``to_others`` per row (scratch .npy files, float64, as
    ``stats.speaker_cosines``) and per speaker ``mean_cosine`` / ``min_cosine``."""
    rows, speaker_index = as_rows(rows), as_rows(speaker_index)
    weights = as_rows(weights) if weights is not None else None
    n, num = len(rows), len(acc.counts)
    paths = {"to_centroid": Path(scratch) / "to_centroid.npy", "to_others": Path(scratch) / "to_others.npy"}
    centroid_sum = np.zeros(num)
    minimum = np.full(num, np.inf)
    step = block_rows or rows_per_block(rows.shape[1] * 8 * 4)
    with NpyWriter(paths["to_centroid"], n, (), np.float64) as tc_out, \
            NpyWriter(paths["to_others"], n, (), np.float64) as to_out:
        for start in range(0, n, step):
            stop = min(n, start + step)
            part = stats_mod._rows(rows.block(start, stop), acc.rule)
            index = np.asarray(speaker_index.block(start, stop), dtype=np.int64)
            centroid = acc.sums[index]
            to_centroid = stats_mod._cos(part, centroid)
            own = part if weights is None else part * np.asarray(weights.block(start, stop), np.float64)[:, None]
            to_others = stats_mod._cos(part, centroid - own)
            single = acc.counts[index] == 1
            to_centroid[single] = 1.0
            to_others[single] = np.nan
            np.add.at(centroid_sum, index, to_centroid)
            np.minimum.at(minimum, index, to_centroid)
            tc_out.write(to_centroid)
            to_out.write(to_others)
    return {"to_centroid": paths["to_centroid"], "to_others": paths["to_others"],
            "mean_cosine": centroid_sum / np.maximum(acc.counts, 1), "min_cosine": minimum}


def outliers(to_others_path: Path, speaker_index, acc: SpeakerAccumulator,
             group_rows: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Pass 3: the flagged rows (``row``, leave-one-out ``score``, ``speaker``), by ``stats.outlier_flags``."""
    speaker_index = as_rows(speaker_index)
    budget = group_rows or OUTLIER_ROWS
    scores = MappedNpy(to_others_path)
    found = {"row": [], "score": [], "speaker": []}
    try:
        eligible = np.flatnonzero(acc.counts >= stats_mod.MIN_UTTERANCES)
        first = 0
        while first < len(eligible):
            last, held = first, 0  # speakers eligible[first:last] hold <= budget rows (at least one speaker)
            while last < len(eligible) and (last == first or held + acc.counts[eligible[last]] <= budget):
                held += acc.counts[eligible[last]]
                last += 1
            group = eligible[first:last]
            lo, hi = int(group[0]), int(group[-1]) + 1
            row_lo, row_hi = int(acc.first_row[group].min()), int(acc.last_row[group].max()) + 1
            rows, values, owners = [], [], []
            step = rows_per_block(16)
            for start in range(row_lo, row_hi, step):
                stop = min(row_hi, start + step)
                index = np.asarray(speaker_index.block(start, stop), dtype=np.int64)
                mine = (index >= lo) & (index < hi)
                mine &= acc.counts[index] >= stats_mod.MIN_UTTERANCES
                if mine.any():
                    rows.append(np.flatnonzero(mine) + start)
                    values.append(scores.block(start, stop)[mine])
                    owners.append(index[mine] - lo)
            if rows:
                rows, values, owners = np.concatenate(rows), np.concatenate(values), np.concatenate(owners)
                flags = stats_mod.outlier_flags(values, owners, hi - lo)
                found["row"].append(rows[flags])
                found["score"].append(values[flags])
                found["speaker"].append(owners[flags] + lo)
            first = last
    finally:
        scores.close()
    return {k: (np.concatenate(v) if v else np.zeros(0, dtype=np.float64 if k == "score" else np.int64))
            for k, v in found.items()}


def outlier_lists(flagged: Dict[str, np.ndarray], keys: List[str], num_speakers: int) -> List[List[str]]:
    """Per speaker, the keys of its flagged utterances, worst first (``keys[i]`` names ``flagged["row"][i]``)."""
    lists: List[List[str]] = [[] for _ in range(num_speakers)]
    order = sorted(range(len(keys)), key=lambda i: (flagged["score"][i], keys[i]))
    for i in order:
        lists[int(flagged["speaker"][i])].append(keys[i])
    return lists


def statistics(rows, speaker_index, num_speakers: int, scratch: Path, rule: str = "plain", weights=None,
               key_of=None, acc: Optional[SpeakerAccumulator] = None, block_rows: Optional[int] = None) -> dict:
    """All passes. ``key_of(rows)`` gives the keys of row numbers (for the outlier lists).
    Returns the accumulator (means), scratch paths of per-row cosines, per-speaker mean/min cosine,
    outlier lists and the flagged rows."""
    if acc is None:
        acc = accumulate(rows, speaker_index, num_speakers, rule, weights, block_rows)
    result = cosines(rows, speaker_index, acc, scratch, weights, block_rows)
    flagged = outliers(result["to_others"], speaker_index, acc)
    keys = key_of(flagged["row"]) if key_of is not None else [str(r) for r in flagged["row"]]
    result.update({"acc": acc, "flagged": flagged, "outliers": outlier_lists(flagged, keys, num_speakers)})
    return result


def summary_view(result: dict) -> dict:
    """What ``stats.summary_block`` reads, from a streamed result."""
    return {"outliers": result["outliers"], "outlier": np.ones(len(result["flagged"]["row"]), dtype=bool)}
