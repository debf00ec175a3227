"""The merge in passes over blocks of rows: memory O(speakers x D) plus a block, whatever the corpus.

Used for ``--formats npy`` and for corpora above ``merge.STREAM_ABOVE`` utterances. Rows come from
the ranks in key order (each rank's results are sorted by scan row; several runs are merged by key),
so the final matrix is written front to back while the speaker sums are accumulated
(``streamstats``); the cosines and outliers are then computed over the memory-mapped matrix, and the
lists, pickles, npz and Kaldi files are written from it a block at a time. Everything equals the
in-memory merge's output (tested on small corpora).

Scratch files (per-row speaker index, durations, the records before their cosine, cosines) live in
a scratch dir inside the final dir under construction and are removed before it is swapped in.
"""
import heapq
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from speakerlab import stats as stats_mod
from speakerlab import streamstats
from speakerlab.npyfile import MappedNpy, NpyWriter, rows_per_block, write_npy
from speakerlab.streamwrite import JsonListWriter, KaldiWriter, NpzMemberWriter, PickleDictWriter

log = logging.getLogger("speakerlab")


class StreamMergeError(Exception):
    pass


@dataclass
class RankResults:
    """One complete rank: its embedded utterances as scan rows (increasing), their embeddings,
    seconds (NaN: take the scan's duration) and chunks; arrays or ``MappedNpy``."""
    rows: object
    matrix: object
    seconds: object
    chunks: object
    failures: List[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def close(self) -> None:
        for part in (self.rows, self.matrix, self.seconds, self.chunks):
            if isinstance(part, MappedNpy):
                part.close()


def _array(source) -> np.ndarray:
    return source.array if isinstance(source, MappedNpy) else np.asarray(source)


def _block(source, start: int, stop: int) -> np.ndarray:
    return source.block(start, stop) if isinstance(source, MappedNpy) else np.asarray(source[start:stop])


@dataclass
class Block:
    """Rows of the merged stream: utterances (scan records), embeddings, seconds, chunks; ``others``:
    the scan's records in the same range that were not embedded (failed, or in a missing rank)."""
    utts: list
    matrix: np.ndarray
    seconds: np.ndarray
    chunks: np.ndarray
    others: list = field(default_factory=list)


def run_blocks(scan, ranks: Sequence[RankResults], run: int, block_rows: int) -> Iterator[Block]:
    """The embedded rows of one run in scan (= key) order, a scan row range at a time."""
    for start in range(0, scan.count, block_rows):
        stop = min(scan.count, start + block_rows)
        pieces = []
        for rank in ranks:
            rows = _array(rank.rows)
            lo, hi = int(np.searchsorted(rows, start)), int(np.searchsorted(rows, stop))
            if hi > lo:
                pieces.append((np.asarray(rows[lo:hi], dtype=np.int64), _block(rank.matrix, lo, hi),
                               np.asarray(_block(rank.seconds, lo, hi), dtype=np.float64),
                               np.asarray(_block(rank.chunks, lo, hi), dtype=np.int64)))
            if isinstance(rank.rows, MappedNpy):
                rank.rows.release(lo, hi)
        if not pieces:
            yield Block([], np.zeros((0, _dim(ranks)), np.float32), np.zeros(0), np.zeros(0, np.int64),
                        scan.rows(start, stop))
            continue
        rows = np.concatenate([p[0] for p in pieces])
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        if len(rows) > 1 and (np.diff(rows) == 0).any():
            raise StreamMergeError(f"run {run}: an utterance was embedded by two ranks (scan row {rows[np.flatnonzero(np.diff(rows) == 0)[0]]})")
        records = scan.rows(start, stop)
        taken = np.zeros(stop - start, dtype=bool)
        taken[rows - start] = True
        utts = [records[r - start] for r in rows.tolist()]
        yield Block(utts, np.concatenate([p[1] for p in pieces])[order],
                    np.concatenate([p[2] for p in pieces])[order], np.concatenate([p[3] for p in pieces])[order],
                    [records[i] for i in np.flatnonzero(~taken).tolist()])


def _dim(ranks) -> int:
    for rank in ranks:
        shape = _array(rank.matrix).shape
        if len(shape) == 2:
            return int(shape[1])
    return 0


def merged_blocks(streams: List[Iterator[Block]], block_rows: int) -> Iterator[Tuple[int, Block]]:
    """(run, row) streams of several runs merged by key; a single run passes through."""
    if len(streams) == 1:
        for block in streams[0]:
            yield 0, block
        return

    def rows_of(run, stream):
        for block in stream:
            for i, utt in enumerate(block.utts):
                yield utt.key, run, utt, block.matrix[i], block.seconds[i], block.chunks[i]
            for utt in block.others:
                yield utt.key, run, utt, None, 0.0, 0

    pending, others = [], []
    last_key, last_path = None, None
    for key, run, utt, row, seconds, chunks in heapq.merge(*(rows_of(r, s) for r, s in enumerate(streams)),
                                                           key=lambda item: item[0]):
        if key == last_key:
            if utt.path != last_path:
                raise StreamMergeError(f"key {key} appears in two runs: {last_path} and {utt.path}")
            raise StreamMergeError("the same utterance was embedded twice (overlapping runs?)")
        last_key, last_path = key, utt.path
        if row is None:
            others.append(utt)
            continue
        pending.append((run, utt, row, seconds, chunks))
        if len(pending) >= block_rows:
            yield from _flush_rows(pending, others)
            pending, others = [], []
    yield from _flush_rows(pending, others)


def _flush_rows(pending, others):
    if pending or others:
        yield -1, Block([p[1] for p in pending], np.stack([p[2] for p in pending]) if pending else
                        np.zeros((0, 0), np.float32), np.array([p[3] for p in pending], dtype=np.float64),
                        np.array([p[4] for p in pending], dtype=np.int64), others)


_text = json.encoder.encode_basestring  # what json.dumps(..., ensure_ascii=False) writes for a str


def _number(value) -> str:
    return "null" if value is None else repr(value)


def record_text(utt, seconds: float, chunks: int) -> str:
    """The utterance record (``merge``'s fields, in its order) as ``json.dumps`` writes it, without
    its trailing speaker_cosine (added in the last pass). Written out by hand: a few times faster."""
    text = (f'{{"key": {_text(utt.key)}, "dataset": {_text(utt.dataset)}, "speaker_id": {_text(utt.speaker)}, '
            f'"speaker_key": {_text(utt.speaker_key)}, "utterance_id": {_text(utt.utterance)}, '
            f'"path": {_text(utt.path)}, "rel_path": {_text(utt.rel_path)}, '
            f'"duration": {round(float(seconds), 4)!r}, "sample_rate": {int(utt.sample_rate)!r}')
    if utt.start is not None:
        text += f', "start": {_number(utt.start)}, "end": {_number(utt.end)}'
    if chunks > 1:
        text += f', "chunks": {int(chunks)!r}'
    return text + "}"


def stream_merge(scans: Sequence, runs_ranks: Sequence[Sequence[RankResults]], out: Path, final: Path,
                 formats: Sequence[str], names: Dict[str, object], speaker_mean: str = "plain",
                 duration_weighted: bool = False, closest_pairs: int = 20,
                 block_rows: Optional[int] = None, failure_keys: Optional[set] = None) -> dict:
    """Write the final files of ``formats`` into ``out`` (a dir under construction, to be moved to
    ``final``) from the runs' scans (``scanfile.ScanFile``) and complete ranks. ``names``: file names
    (``finaldir``'s). Returns what the summary needs."""
    out = Path(out)
    scratch = out / names["scratch"]
    scratch.mkdir()
    total = sum(len(r) for ranks in runs_ranks for r in ranks)
    dims = {int(_array(r.matrix).shape[1]) for ranks in runs_ranks for r in ranks if len(r)}
    if len(dims) > 1:
        raise StreamMergeError(f"embedding dimensions differ between ranks: {sorted(dims)}")
    dim = dims.pop() if dims else 0
    block_rows = block_rows or rows_per_block(max(dim, 1) * 4, 16 << 20)

    # the speakers of every run, in one sorted table (speakers without an embedded row drop out later)
    owners: Dict[str, Tuple[str, str]] = {}
    local_maps = []
    for scan in scans:
        table = scan.speakers()
        for dataset, speaker, spk_key in table:
            owners.setdefault(spk_key or f"{dataset}_{speaker}", (dataset, speaker))
        local_maps.append(table)
    all_speakers = sorted(owners)
    position = {k: i for i, k in enumerate(all_speakers)}
    num_all = len(all_speakers)
    speaker_names = [owners[k] for k in all_speakers]

    # pass 1: matrix, speaker sums, scratch columns, records without cosines
    acc = streamstats.SpeakerAccumulator(num_all, dim, speaker_mean, duration_weighted)
    speaker_seconds = np.zeros(num_all)
    datasets: Dict[str, dict] = {}
    max_key = 1
    matrix_out = NpyWriter(out / names["npy_matrix"], total, (dim,)) if "npy" in formats else \
        NpyWriter(scratch / "matrix.npy", total, (dim,))
    spk_out = NpyWriter(scratch / "speaker_index.npy", total, (), np.int32)
    dur_out = NpyWriter(scratch / "durations.npy", total, (), np.float64)
    pre = JsonListWriter(scratch / "records.jsonl", lines=True)
    streams = [run_blocks(scan, ranks, run, block_rows) for run, (scan, ranks) in enumerate(zip(scans, runs_ranks))]
    written, inputs = 0, 0
    failure_keys = failure_keys or set()

    def dataset_entry(name):
        return datasets.setdefault(name, {"utterances": 0, "speakers": 0, "duration_s": 0.0, "failures": 0})
    failed_in: Dict[str, int] = {}
    try:
        for _, block in merged_blocks(streams, block_rows):
            inputs += len(block.utts) + len(block.others)
            for utt in block.others:
                if utt.key in failure_keys:
                    failed_in[utt.dataset] = failed_in.get(utt.dataset, 0) + 1
            if not block.utts:
                continue
            spk = np.empty(len(block.utts), dtype=np.int64)
            seconds = block.seconds.copy()
            for i, utt in enumerate(block.utts):
                spk[i] = position[utt.speaker_key]
                if seconds[i] != seconds[i]:  # not recorded at embedding time
                    seconds[i] = utt.duration
                pre.write_text(record_text(utt, seconds[i], block.chunks[i]))
                entry = dataset_entry(utt.dataset)
                entry["utterances"] += 1
                entry["duration_s"] += round(float(seconds[i]), 4)
                max_key = max(max_key, len(utt.key))
            matrix_out.write(block.matrix)
            spk_out.write(spk.astype(np.int32))
            dur_out.write(seconds)
            acc.add(block.matrix, spk, seconds if duration_weighted else None)
            np.add.at(speaker_seconds, spk, seconds)
            written += len(block.utts)
        if written != total:
            raise StreamMergeError(f"the ranks hold {total} embeddings but {written} matched their scans' rows")
        matrix_path = matrix_out.close()
        spk_out.close()
        dur_out.close()
    except BaseException:
        for writer in (matrix_out, spk_out, dur_out):
            writer.abort()
        raise
    finally:
        pre.close()

    _check_speaker_keys(scans, runs_ranks, local_maps)
    keep = acc.counts > 0
    speaker_keys = [k for k, kept in zip(all_speakers, keep) if kept]

    # passes 2 and 3: cosines, outliers
    rows = MappedNpy(matrix_path)
    spk_rows = MappedNpy(scratch / "speaker_index.npy")
    weights = MappedNpy(scratch / "durations.npy") if duration_weighted else None
    try:
        cos = streamstats.cosines(rows, spk_rows, acc, scratch, weights)
        flagged = streamstats.outliers(cos["to_others"], spk_rows, acc)
    finally:
        for handle in (rows, spk_rows, weights):
            if handle is not None:
                handle.close()
    durations = MappedNpy(scratch / "durations.npy")
    total_duration = float(np.sum(durations.array)) if len(durations) else 0.0
    durations.close()

    # pass 4: the utterance files, row by row, with the cosine appended to each record
    flagged_rows = {int(r): i for i, r in enumerate(flagged["row"])}
    flagged_keys = [""] * len(flagged_rows)
    files, renamed = _write_utterance_files(out, final, formats, names, matrix_path, scratch, total, dim, max_key,
                                            flagged_rows, flagged_keys, np.cumsum(acc.counts > 0) - 1)
    outliers = streamstats.outlier_lists(flagged, flagged_keys, num_all)

    # speakers
    means = acc.means()[keep] if len(speaker_keys) else np.zeros((0, dim), np.float32)
    spk_list = []
    for s in np.flatnonzero(keep):
        dataset, speaker = speaker_names[s]
        spk_list.append({"key": all_speakers[s], "dataset": dataset, "speaker_id": speaker,
                         "num_utterances": int(acc.counts[s]), "duration_s": round(float(speaker_seconds[s]), 3),
                         "mean_cosine": round(float(cos["mean_cosine"][s]), 4),
                         "min_cosine": round(float(cos["min_cosine"][s]), 4), "outliers": outliers[s]})
        datasets[dataset]["speakers"] += 1
    files += _write_speaker_files(out, final, formats, names, speaker_keys, means, spk_list, renamed)
    pairs = stats_mod.closest_pairs(means, closest_pairs)
    counts = acc.counts[keep]
    view = {"outliers": [outliers[s] for s in np.flatnonzero(keep)], "outlier": np.ones(len(flagged_rows), bool)}
    for name, count in failed_in.items():  # in the in-memory merge's order: after the embedded ones
        dataset_entry(name)["failures"] += count
    for entry in datasets.values():
        entry["duration_s"] = round(entry["duration_s"], 3)
    shutil.rmtree(scratch)
    return {"utterances": total, "inputs": inputs, "speakers": len(speaker_keys), "dim": dim, "total_duration_s": total_duration,
            "datasets": datasets, "counts": counts, "stats_view": view if total else None,
            "closest_speaker_pairs": [[speaker_keys[i], speaker_keys[j], round(min(c, 1.0), 4)] for i, j, c in pairs],
            "files": files, "kaldi_renamed_keys": renamed}


def _check_speaker_keys(scans, runs_ranks, tables) -> None:
    """One speaker key for two different speakers of two runs (each with embedded rows): refused."""
    if len(scans) < 2:
        return
    seen: Dict[str, Tuple[str, str]] = {}
    for scan, ranks, table in zip(scans, runs_ranks, tables):
        used = np.zeros(len(table), dtype=bool)
        for rank in ranks:
            rows = _array(rank.rows)
            for start in range(0, len(rows), 1 << 20):
                part = np.asarray(rows[start:start + (1 << 20)], dtype=np.int64)
                for first in np.unique(part // scan.group_rows):
                    group = scan.column("spk", int(first) * scan.group_rows, (int(first) + 1) * scan.group_rows)
                    mine = part[(part // scan.group_rows) == first] - int(first) * scan.group_rows
                    used[np.asarray(group)[mine]] = True
        for i in np.flatnonzero(used):
            dataset, speaker, spk_key = table[i]
            key = spk_key or f"{dataset}_{speaker}"
            if seen.setdefault(key, (dataset, speaker)) != (dataset, speaker):
                raise StreamMergeError(
                    f"speaker key '{key}' names two speakers in different runs: dataset '{seen[key][0]}' speaker "
                    f"'{seen[key][1]}', and dataset '{dataset}' speaker '{speaker}'; extract them in one run "
                    "(which tells them apart) or rename one")


def _write_utterance_files(out, final, formats, names, matrix_path, scratch, total, dim, max_key,
                           flagged_rows, flagged_keys, speaker_row):
    files: List[str] = []
    writers = {}
    index = None
    if "npy" in formats:
        writers["jsonl"] = JsonListWriter(out / names["utterance_jsonl"], lines=True)
        # per row: where its line starts in the .jsonl, and its speaker's row (lookups without a key dict)
        index = NpyWriter(out / names["npy_index"], total, (2,), np.int64)
        speakers = MappedNpy(scratch / "speaker_index.npy")
        offset = 0
        files += [names["npy_matrix"], names["npy_index"], names["utterance_jsonl"]]
    if "pkl" in formats:
        writers["json"] = JsonListWriter(out / names["utterance_json"], lines=False)
        writers["pkl"] = PickleDictWriter(out / names["utterance_pkl"])
        files += [names["utterance_pkl"], names["utterance_json"]]
    if "npz" in formats:
        writers["npz"] = NpzMemberWriter(out / names["utterance_npz"])
        files.append(names["utterance_npz"])
    if "kaldi" in formats:
        ark, scp = names["utterance_kaldi"]
        writers["kaldi"] = KaldiWriter(out / ark, out / scp, Path(final).absolute() / ark)
        files += [ark, scp]
    matrix = MappedNpy(matrix_path)
    cosines = MappedNpy(scratch / "to_centroid.npy")
    keys_for_npz = [] if "npz" in writers else None
    try:
        with open(scratch / "records.jsonl", encoding="utf-8") as records:
            step = rows_per_block(max(dim, 1) * 4)
            row = 0
            for start, block in matrix.blocks(step):
                cos = cosines.block(start, start + len(block))
                if index is not None:
                    starts = np.empty(len(block), dtype=np.int64)
                for i in range(len(block)):
                    text = records.readline().rstrip("\n")
                    full = text[:-1] + ', "speaker_cosine": ' + repr(round(float(cos[i]), 4)) + "}"
                    key = None
                    if row in flagged_rows or "pkl" in writers or "kaldi" in writers or keys_for_npz is not None:
                        record = json.loads(full)
                        key = record["key"]
                        if row in flagged_rows:
                            flagged_keys[flagged_rows[row]] = key
                        if "pkl" in writers:
                            writers["pkl"].write(key, {"embedding": block[i].copy(), "dataset": record["dataset"],
                                                       "speaker_id": record["speaker_id"],
                                                       "utterance_id": record["utterance_id"], "path": record["path"]})
                        if "kaldi" in writers:
                            writers["kaldi"].write(key, block[i])
                        if keys_for_npz is not None:
                            keys_for_npz.append(key)
                    for kind in ("jsonl", "json"):
                        if kind in writers:
                            writers[kind].write_text(full)
                    if index is not None:
                        starts[i] = offset
                        offset += (len(full) if full.isascii() else len(full.encode("utf-8"))) + 1
                    row += 1
                if index is not None:
                    index.write(np.stack([starts, speaker_row[speakers.block(start, start + len(block))]], axis=1))
                if keys_for_npz is not None and len(keys_for_npz) >= 1 << 20:
                    _spill_keys(scratch, keys_for_npz)
        if keys_for_npz is not None:
            _spill_keys(scratch, keys_for_npz)
            npz = writers["npz"]
            npz.member("keys", (total,), f"<U{max_key}")
            with open(scratch / "keys.txt", encoding="utf-8") as keys:
                batch = []
                for line in keys:
                    batch.append(line.rstrip("\n"))
                    if len(batch) >= 65536:
                        npz.write(np.array(batch, dtype=f"<U{max_key}"))
                        batch = []
                if batch:
                    npz.write(np.array(batch, dtype=f"<U{max_key}"))
            npz.member("embeddings", (total, dim), np.float32)
            for _, block in matrix.blocks():
                npz.write(block)
        if index is not None:
            index.close()
    except BaseException:
        if index is not None:
            index.abort()
        raise
    finally:
        matrix.close()
        cosines.close()
        if index is not None:
            speakers.close()
        for writer in writers.values():
            writer.close()
    renamed = dict(writers["kaldi"].renamed) if "kaldi" in writers else {}
    _check_kaldi_names(renamed, scratch / "records.jsonl")
    return files, renamed


def _check_kaldi_names(renamed: Dict[str, str], records: Path) -> None:
    """Keys with whitespace become ``_`` in Kaldi files: refused if that makes two keys one."""
    if not renamed:
        return
    targets = list(renamed.values())
    if len(set(targets)) != len(targets):
        raise StreamMergeError("keys collide once whitespace is replaced for Kaldi (xvector)")
    wanted = set(targets)
    with open(records, encoding="utf-8") as handle:
        for line in handle:
            if json.loads(line)["key"] in wanted:
                raise StreamMergeError("keys collide once whitespace is replaced for Kaldi (xvector)")


def _spill_keys(scratch: Path, keys: List[str]) -> None:
    """Keys for the npz are written to a scratch file, a million at a time: the npz's keys member needs
    its width (known once all keys are seen) before its first byte."""
    with open(scratch / "keys.txt", "a", encoding="utf-8") as handle:
        for key in keys:
            handle.write(key + "\n")
    keys.clear()


def _write_speaker_files(out, final, formats, names, speaker_keys, means, spk_list, renamed) -> List[str]:
    files: List[str] = []
    if "npy" in formats:
        write_npy(out / names["npy_speaker_matrix"], means.astype(np.float32))
        writer = JsonListWriter(out / names["speaker_jsonl"], lines=True)
        for record in spk_list:
            writer.write(record)
        writer.close()
        files += [names["npy_speaker_matrix"], names["speaker_jsonl"]]
    if "pkl" in formats:
        writer = JsonListWriter(out / names["speaker_json"], lines=False)
        pickles = PickleDictWriter(out / names["speaker_pkl"])
        for key, row, record in zip(speaker_keys, means, spk_list):
            writer.write(record)
            entry = {"embedding": row.copy(), "dataset": record["dataset"], "speaker_id": record["speaker_id"],
                     "num_utterances": record["num_utterances"]}
            entry.update({f: record[f] for f in ("duration_s", "mean_cosine", "min_cosine", "outliers")})
            pickles.write(key, entry)
        writer.close()
        pickles.close()
        files += [names["speaker_pkl"], names["speaker_json"]]
    if "npz" in formats:
        npz = NpzMemberWriter(out / names["speaker_npz"])
        width = max([len(k) for k in speaker_keys] + [1])
        npz.member("keys", (len(speaker_keys),), f"<U{width}")
        npz.write(np.array(speaker_keys, dtype=f"<U{width}"))
        npz.member("embeddings", means.shape, np.float32)
        npz.write(means)
        npz.close()
        files.append(names["speaker_npz"])
    if "kaldi" in formats:
        ark, scp = names["speaker_kaldi"]
        writer = KaldiWriter(out / ark, out / scp, Path(final).absolute() / ark)
        for key, row in zip(speaker_keys, means):
            writer.write(key, row)
        writer.close()
        renamed.update(writer.renamed)
        files += [ark, scp]
    return files


def results_from_arrays(keys: Sequence[str], matrix: np.ndarray, failures: List[dict], extra: Dict[str, dict],
                        row_of: Dict[str, int]) -> RankResults:
    """A rank's results held in memory (a rank npz: keys in any order) as RankResults in scan-row order.
    ``row_of``: key -> scan row, for at least this rank's keys."""
    try:
        rows = np.array([row_of[k] for k in keys], dtype=np.int64)
    except KeyError as exc:
        raise StreamMergeError(f"a rank holds key {exc.args[0]!r}, which is not in the scan beside it") from None
    order = np.argsort(rows, kind="stable")
    seconds = np.array([extra.get(k, {}).get("seconds", np.nan) for k in keys], dtype=np.float64)
    chunks = np.array([extra.get(k, {}).get("chunks", 1) for k in keys], dtype=np.int64)
    matrix = np.asarray(matrix, dtype=np.float32)
    return RankResults(rows[order], matrix[order] if len(order) else matrix, seconds[order], chunks[order],
                       list(failures))
