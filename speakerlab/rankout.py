"""A rank's final results, written from its part files a block at a time and read back mapped.

The rank's ``embeddings.npz`` (members stored, not compressed, so they map in place):

    keys        (n,) str     utterance keys, in scan-row (= key) order
    rows        (n,) int64   their rows in the scan file (increasing)
    embeddings  (n, D) f32
    seconds     (n,) f64     audio seconds embedded; chunks (n,) int32: pieces of a long file (1: whole)
    failures    JSON text    the rank's failed files

Written from the parts without holding them: the parts' keys give each row's place, then the
embeddings are gathered block by block from the mapped parts. ``merge`` reads it as
``streammerge.RankResults`` (mapped members); npz files of earlier versions (keys in any order,
``extra`` JSON) are read into memory and sorted (``results_from_arrays``).
"""
import bisect
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from speakerlab.npyfile import MappedNpy, rows_per_block
from speakerlab.streamwrite import NpzMemberWriter, PickleDictWriter

# rows per block when a rank writes its outputs: a cap in rows, not only bytes, since a block of keys
# costs ~200 bytes a row in Python strings whatever the embedding size; so what a rank holds while it
# finalizes stops growing with its shard past this many rows
BLOCK_ROWS = 4096


def _part_columns(path: Path):
    """(keys, seconds, chunks, failures) of a part file (an npz with keys, embeddings, failures, extra)."""
    with np.load(path, allow_pickle=False) as data:
        keys = [str(k) for k in data["keys"]]
        extra = json.loads(str(data["extra"])) if "extra" in data.files else {}
        failures = json.loads(str(data["failures"])) if "failures" in data.files else []
    seconds = np.array([extra.get(k, {}).get("seconds", np.nan) for k in keys], dtype=np.float64)
    chunks = np.array([extra.get(k, {}).get("chunks", 1) for k in keys], dtype=np.int32)
    return keys, seconds, chunks, failures


class ShardIndex:
    """A rank's shard (contiguous scan rows, sorted by key) looked up by key with bisection: no
    per-key dict (a rank holds only its shard's records and a list of references to their keys)."""

    def __init__(self, shard: Sequence, first_row: int = 0):
        self.shard, self.first_row = shard, first_row
        self.keys = [u.key for u in shard]

    def position(self, key: str) -> int:
        i = bisect.bisect_left(self.keys, key)
        if i == len(self.keys) or self.keys[i] != key:
            raise KeyError(key)
        return i

    def row(self, key: str) -> int:
        return self.first_row + self.position(key)

    def __getitem__(self, key: str):
        """The utterance of ``key``."""
        return self.shard[self.position(key)]


def write_rank_npz(parts: Sequence[Path], index: ShardIndex, out: Path, dim: Optional[int] = None) -> dict:
    """Write ``out`` from the part files; returns counts and the failures. ``index``: the shard. A key
    flushed twice (a rerun that redid a part) counts once. Held meanwhile: a few numbers per row."""
    out = Path(out)
    pieces = []
    failures: List[dict] = []
    for number, part in enumerate(parts):
        part_keys, part_seconds, part_chunks, part_failures = _part_columns(part)
        failures += part_failures
        rows = np.array([index.row(k) for k in part_keys], dtype=np.int64)
        pieces.append((rows, np.full(len(rows), number, np.int32), np.arange(len(rows), dtype=np.int32),
                       part_seconds, part_chunks))
    columns = [np.concatenate([p[i] for p in pieces]) if pieces else np.zeros(0) for i in range(5)]
    scan_rows, where_part, where_row, seconds, chunks = columns
    scan_rows, first = np.unique(scan_rows.astype(np.int64), return_index=True)  # sorted; first flush wins
    where_part, where_row = where_part[first].astype(np.int64), where_row[first].astype(np.int64)
    seconds, chunks = seconds[first].astype(np.float64), chunks[first].astype(np.int32)
    keys = [index.shard[r - index.first_row].key for r in scan_rows.tolist()]
    maps = [MappedNpy.member(part, "embeddings") for part in parts]
    try:
        if dim is None:
            dims = {m.shape[1] for m in maps if len(m.shape) == 2 and len(m)}
            dim = dims.pop() if dims else 0
        step = min(BLOCK_ROWS, rows_per_block(max(dim, 1) * 4))

        def blocks():
            for start in range(0, len(keys), step):
                parts_here = where_part[start:start + step]
                rows_here = where_row[start:start + step]
                block = np.empty((len(parts_here), dim), dtype=np.float32)
                for number in np.unique(parts_here):
                    mine = parts_here == number
                    block[mine] = maps[number].take(rows_here[mine])
                yield block
        write_rank_arrays(out, keys, scan_rows, dim, blocks(), seconds, chunks, failures)
    finally:
        for m in maps:
            m.close()
    return {"embedded": len(keys), "failed": len(failures), "failures": failures, "dim": dim,
            "audio_seconds": float(np.nansum(seconds)) if len(seconds) else 0.0}


def write_rank_arrays(out: Path, keys: Sequence[str], rows: np.ndarray, dim: int, blocks, seconds: np.ndarray,
                      chunks: np.ndarray, failures: List[dict]) -> None:
    """Write a rank's npz (atomically) from its columns; the embeddings come as an iterable of blocks
    of rows, in order."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.npz")
    writer = NpzMemberWriter(tmp)
    try:
        width = max([len(k) for k in keys] + [1])
        writer.member("keys", (len(keys),), f"<U{width}")
        for first in range(0, len(keys), BLOCK_ROWS):
            writer.write(np.array(keys[first:first + BLOCK_ROWS], dtype=f"<U{width}"))
        writer.member("rows", (len(keys),), np.int64)
        writer.write(np.asarray(rows, dtype=np.int64))
        writer.member("embeddings", (len(keys), dim), np.float32)
        count = 0
        for block in blocks:
            writer.write(block)
            count += len(block)
        if count != len(keys):
            raise ValueError(f"{out}: {count} embeddings for {len(keys)} keys")
        writer.member("seconds", (len(keys),), np.float64)
        writer.write(np.asarray(seconds, dtype=np.float64))
        writer.member("chunks", (len(keys),), np.int32)
        writer.write(np.asarray(chunks, dtype=np.int32))
        text = json.dumps(failures, ensure_ascii=False)
        writer.member("failures", (), f"<U{max(1, len(text))}")
        writer.write(np.array(text, dtype=f"<U{max(1, len(text))}"))
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def write_rank_pickles(npz: Path, utterances, utt_pkl: Path, spk_pkl: Path) -> None:
    """The seed's per-rank pickles, from the rank's npz, a block at a time: utterances in key order;
    speakers (sorted) with the mean of their utterances (float64 sums in key order)."""
    keys_map = MappedNpy.member(npz, "keys")
    matrix = MappedNpy.member(npz, "embeddings")
    sums: Dict[str, np.ndarray] = {}
    counts: Dict[str, int] = {}
    first_of: Dict[str, object] = {}
    tmp_utt = utt_pkl.with_name(f".{utt_pkl.name}.tmp{os.getpid()}")
    try:
        writer = PickleDictWriter(tmp_utt)
        for start, block in matrix.blocks(min(BLOCK_ROWS, rows_per_block(matrix.row_bytes))):
            names = keys_map.block(start, start + len(block))
            for key, row in zip(names.tolist(), block):
                utt = utterances[key]
                writer.write(key, {"embedding": row.copy(), "dataset": utt.dataset, "speaker_id": utt.speaker,
                                   "utterance_id": utt.utterance, "path": utt.path})
                spk = utt.speaker_key
                if spk in sums:
                    sums[spk] += row.astype(np.float64)
                    counts[spk] += 1
                else:
                    sums[spk], counts[spk], first_of[spk] = row.astype(np.float64), 1, utt
        writer.close()
        os.replace(tmp_utt, utt_pkl)
    except BaseException:
        tmp_utt.unlink(missing_ok=True)
        raise
    finally:
        keys_map.close()
        matrix.close()
    tmp_spk = spk_pkl.with_name(f".{spk_pkl.name}.tmp{os.getpid()}")
    try:
        writer = PickleDictWriter(tmp_spk)
        for spk in sorted(sums):
            writer.write(spk, {"embedding": (sums[spk] / counts[spk]).astype(np.float32),
                               "dataset": first_of[spk].dataset, "speaker_id": first_of[spk].speaker,
                               "num_utterances": counts[spk]})
        writer.close()
        os.replace(tmp_spk, spk_pkl)
    except BaseException:
        tmp_spk.unlink(missing_ok=True)
        raise


def read_rank_results(npz: Path, row_of=None):
    """The rank's results as ``streammerge.RankResults``: members mapped when the npz has ``rows``;
    an npz of an earlier version is read whole and sorted (``row_of(keys)`` gives scan rows)."""
    from speakerlab import streammerge
    with np.load(npz, allow_pickle=False) as data:
        files = set(data.files)
        failures = json.loads(str(data["failures"])) if "failures" in files else []
        if "rows" not in files:
            keys = [str(k) for k in data["keys"]]
            extra = json.loads(str(data["extra"])) if "extra" in files else {}
            matrix = data["embeddings"].astype(np.float32)
    if "rows" in files:
        return streammerge.RankResults(MappedNpy.member(npz, "rows"), MappedNpy.member(npz, "embeddings"),
                                       MappedNpy.member(npz, "seconds"), MappedNpy.member(npz, "chunks"), failures)
    return streammerge.results_from_arrays(keys, matrix, failures, extra, row_of(keys))


def read_rank_keys(npz: Path) -> List[str]:
    with np.load(npz, allow_pickle=False) as data:
        return [str(k) for k in data["keys"]]
