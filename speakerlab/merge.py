"""Stage 2: fold the ranks' results into the final files.

Refuses (naming them) missing or incomplete ranks and ranks made with another model, features or
world size, unless ``--allow_partial``. Several output dirs of separate runs merge into one when
their model identity and feature settings agree. Speaker embeddings are computed here, from every
utterance of the speaker across ranks, never as a mean of per-rank means; so are the per-speaker
statistics (centroid cosines, outliers) and the closest speaker pairs (speakerlab/stats.py).
"""
import argparse
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from speakerlab import data as data_mod
from speakerlab import finaldir
from speakerlab import stats as stats_mod
from speakerlab.rundir import METADATA, RunDir, RunDirError, rank_dir_name, scan_fingerprint

log = logging.getLogger("speakerlab")
FORMATS = ("pkl", "npz", "kaldi", "npy")


class MergeError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Merge per-rank speaker embeddings into final files.")
    p.add_argument("--input_dir", required=True, nargs="+",
                   help="extraction output dir(s) holding rank_XX/ (several: separate runs, same model)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--formats", default=None,
                   help="comma list of pkl (the seed's pickles + JSON lists), npz (pickle-free), kaldi (ark/scp), "
                        "npy (the set that scales: memory-mapped .npy + .jsonl lists, merged with bounded memory); "
                        f"default pkl,npz up to {STREAM_ABOVE:,} utterances, npy above")
    p.add_argument("--speaker_mean", choices=["plain", "normalized"], default="plain",
                   help="plain: mean of utterance embeddings (the seed's rule); normalized: mean of L2-normalised ones")
    p.add_argument("--duration_weighted", action="store_true",
                   help="weight each utterance by its duration in the speaker mean")
    p.add_argument("--closest_pairs", type=int, default=20, metavar="N",
                   help="list the N most similar speaker pairs in summary.json (possible duplicate identities)")
    p.add_argument("--allow_partial", action="store_true",
                   help="merge the complete ranks even if some are missing or unfinished")
    return p


# --- reading the ranks ---------------------------------------------------------------------
IDENTITY_FIELDS = ("model_sha256", "model_config", "features", "dtype", "backend", "channels", "max_chunk_s", "fused")
SCAN_FIELDS = ("data_root", "source", "num_utterances", "keys_sha1")


def collect_run(input_dir: Path, allow_partial: bool):
    """Return (scan file, open, [rank metadata], problems) for one extraction output dir."""
    run_dir = RunDir(input_dir)
    if not run_dir.has_scan():
        raise MergeError(f"{input_dir} has no {run_dir.scan_path.name}: is it an extraction output dir?")
    handle = run_dir.open_scan()  # RunDirError (unreadable): an environment error, exit 1
    try:
        metas, problems = _collect_ranks(input_dir, run_dir, scan_fingerprint(handle.result([])), allow_partial)
    except BaseException:
        handle.close()
        raise
    return handle, metas, problems


def _collect_ranks(input_dir: Path, run_dir: RunDir, beside: dict, allow_partial: bool):
    ranks: Dict[int, dict] = {}
    problems: List[str] = []
    for rank in run_dir.ranks():
        name = rank_dir_name(rank)
        meta = run_dir.read_metadata(rank)
        if meta is None:
            problems.append(f"{name}: no readable {METADATA}")
            continue
        if not meta.get("complete"):
            problems.append(f"{name}: incomplete (extraction not finished)")
            continue
        theirs = meta.get("fingerprint") or {}
        differ = [k for k in SCAN_FIELDS if theirs.get(k) != beside[k]]
        if differ:  # another run wrote this dir's scan or this rank: never mix them
            raise MergeError(f"{input_dir}: {name} was made from another scan than the {run_dir.scan_path.name} beside it "
                             f"({', '.join(differ)} differ; two runs wrote into this dir?); rerun the extraction "
                             "with --overwrite, or use a fresh --output_dir")
        broken = run_dir.check_rank_outputs(rank, meta)
        if broken:
            problems.append(f"{name} is marked complete but {broken}: rerun the extraction with the same "
                            "arguments to redo it")
            continue
        ranks[rank] = meta
    if not ranks:
        raise MergeError(f"{input_dir}: no complete rank results" + (f" ({'; '.join(problems)})" if problems else ""))
    worlds = {m["world_size"] for m in ranks.values()}
    if len(worlds) > 1:
        raise MergeError(f"{input_dir}: ranks come from different world sizes {sorted(worlds)}")
    world = worlds.pop()
    missing = [r for r in range(world)
               if r not in ranks and not any(p.startswith(rank_dir_name(r)) for p in problems)]
    problems += [f"{rank_dir_name(r)}: missing" for r in missing]
    reference = ranks[min(ranks)]["fingerprint"]
    for rank, meta in sorted(ranks.items()):
        theirs = {k: v for k, v in meta["fingerprint"].items() if k != "rank"}
        ours = {k: v for k, v in reference.items() if k != "rank"}
        if theirs != ours:
            diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise MergeError(f"{input_dir}: {rank_dir_name(rank)} was made differently from "
                             f"{rank_dir_name(min(ranks))} ({', '.join(diff)} differ)")
    if problems and not allow_partial:
        raise MergeError(f"{input_dir}: cannot merge: " + "; ".join(problems) +
                         " (finish those ranks, or pass --allow_partial)")
    return [ranks[r] for r in sorted(ranks)], problems


def identity(meta: dict) -> dict:
    return {k: meta["fingerprint"].get(k) for k in IDENTITY_FIELDS}


# --- speaker means -------------------------------------------------------------------------
def speaker_means(matrix: np.ndarray, speaker_index: np.ndarray, num_speakers: int, rule: str,
                  weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Exact per-speaker means (float64 accumulation, in chunks) of the rows of ``matrix``."""
    sums = stats_mod.speaker_sums(matrix, speaker_index, num_speakers, rule, weights)
    totals = np.bincount(speaker_index, weights=weights, minlength=num_speakers)
    return (sums / totals[:, None]).astype(np.float32)


def check_speaker_keys(utterances) -> None:
    """Keys are unique within a run (data.assign_keys), but two runs may each give one key to a
    different speaker (a_b/c in one, a/b_c in the other): refuse rather than mix their voices."""
    owner: Dict[str, tuple] = {}
    for utt in utterances:
        name = (utt.dataset, utt.speaker)
        if owner.setdefault(utt.speaker_key, name) != name:
            raise MergeError(f"speaker key '{utt.speaker_key}' names two speakers in different runs: dataset "
                             f"'{owner[utt.speaker_key][0]}' speaker '{owner[utt.speaker_key][1]}', and dataset "
                             f"'{name[0]}' speaker '{name[1]}' ({utt.path}); extract them in one run (which "
                             "tells them apart) or rename one")


# --- main ----------------------------------------------------------------------------------
STREAM_ABOVE = 2_000_000  # utterances; above it merge streams and writes the npy set by default


def choose_formats(formats: Optional[List[str]], total: int) -> List[str]:
    """The formats asked for, or the default for this size: the seed's pickles + JSON lists and npz up
    to STREAM_ABOVE utterances, the npy set above (pickles only on request)."""
    if formats is None:
        formats = ["npy"] if total > STREAM_ABOVE else ["pkl", "npz"]
    elif "npy" not in formats and "pkl" not in formats and total <= STREAM_ABOVE:
        formats = ["pkl"] + list(formats)  # the seed's files come with every small merge
    return list(formats)


def merge(input_dirs: List[Path], output_dir: Path, formats: Optional[List[str]] = None, speaker_mean: str = "plain",
          duration_weighted: bool = False, allow_partial: bool = False, closest_pairs: int = 20) -> dict:
    """Merge the run dirs into ``output_dir``. ``formats`` None: the default for the corpus size.
    With ``npy``, or above STREAM_ABOVE utterances, the merge streams (streammerge.py: memory
    O(speakers x D)); otherwise it holds everything in memory. Both write the same numbers."""
    runs = []
    try:
        for d in input_dirs:
            runs.append(collect_run(Path(d), allow_partial))
        first_identity = identity(runs[0][1][0])
        for directory, (_, metas, _) in zip(input_dirs[1:], runs[1:]):
            other = identity(metas[0])
            if other != first_identity:
                diff = sorted(k for k in first_identity if first_identity[k] != other[k])
                raise MergeError(f"{directory} was made with different {', '.join(diff)} than {input_dirs[0]}; "
                                 "only runs with the same model and features can be merged")
        total = sum((m.get("counts") or {}).get("embedded", 0) for _, metas, _ in runs for m in metas)
        formats = choose_formats(formats, total)
        if "npy" in formats or total > STREAM_ABOVE:
            return merge_streamed(input_dirs, runs, output_dir, formats, speaker_mean, duration_weighted,
                                  closest_pairs)
        return merge_in_memory(input_dirs, runs, output_dir, formats, speaker_mean, duration_weighted,
                               closest_pairs)
    finally:
        for handle, _, _ in runs:
            handle.close()


def run_summary(input_dirs, runs, pieces: dict, formats, speaker_mean, duration_weighted) -> dict:
    """summary.json, from what either merge computed (``pieces``)."""
    meta0 = runs[0][1][0]
    return {
        "total_utterances": pieces["utterances"],
        "total_speakers": pieces["speakers"],
        "embedding_dimension": int(pieces["dim"]),
        "total_duration_s": round(float(pieces["total_duration_s"]), 3),
        "total_input_files": pieces["inputs"],
        "failures": pieces["failures"],
        "scan_errors": len(pieces["scan_errors"]),
        "key_renames": pieces["key_renames"],
        "ignored_files": pieces["ignored"],
        "datasets": dict(sorted(pieces["datasets"].items())),
        "speaker_mean": {"rule": speaker_mean, "duration_weighted": duration_weighted},
        "speaker_statistics": stats_mod.summary_block(pieces["counts"], pieces["stats_view"]),
        "closest_speaker_pairs": pieces["closest_speaker_pairs"],
        "model": meta0["model"],
        "features": meta0["fingerprint"]["features"],
        "dtype": meta0["fingerprint"]["dtype"],
        "channels": meta0["fingerprint"]["channels"],
        "max_chunk_s": meta0["fingerprint"]["max_chunk_s"],
        "runs": [{"input_dir": str(Path(d).absolute()), "data_root": scan.meta["data_root"],
                  "source": scan.meta.get("source"), "world_size": metas[0]["world_size"],
                  "ranks_merged": [m["rank"] for m in metas],
                  "started": min(m["started"] for m in metas), "finished": max(m["finished"] for m in metas),
                  "command": metas[0]["command"], "devices": sorted({m["device"] for m in metas}),
                  "batch_policy": metas[0].get("batch_policy"), "versions": metas[0].get("versions"),
                  "engine": metas[0].get("engine"),
                  "run_ids": sorted({m.get("run_id") or "" for m in metas})}
                 for d, (scan, metas, _) in zip(input_dirs, runs)],
        "partial": bool(pieces["problems"]),
        "problems": pieces["problems"],
        "formats": formats,
        "merge_command": sys.argv,
        "created": datetime.now(timezone.utc).isoformat(),
    }


def _run_facts(input_dirs, runs):
    """Problems, scan errors, key renames and ignored files of the runs (from the scans' records)."""
    problems, scan_errors, key_renames, ignored = [], [], [], {}
    for directory, (scan, _, run_problems) in zip(input_dirs, runs):
        problems += [f"{directory}: {p}" for p in run_problems]
        scan_errors += [{"key": None, **error} for error in scan.meta.get("errors", [])]
        key_renames += scan.meta.get("renames", [])
        for reason, count in scan.meta.get("ignored", {}).items():
            ignored[reason] = ignored.get(reason, 0) + count
    return problems, scan_errors, key_renames, ignored


def _merged_from(input_dirs, runs) -> List[dict]:
    return [{"input_dir": str(Path(d).absolute()), "run_ids": sorted({m.get("run_id") or "" for m in metas})}
            for d, (_, metas, _) in zip(input_dirs, runs)]


def merge_streamed(input_dirs, runs, output_dir: Path, formats, speaker_mean, duration_weighted,
                   closest_pairs) -> dict:
    """The merge in passes over blocks (streammerge.py): memory O(speakers x D) plus a block."""
    from speakerlab import streammerge
    problems, scan_errors, key_renames, ignored = _run_facts(input_dirs, runs)
    ranks, failures = [], []
    for directory, (scan, metas, _) in zip(input_dirs, runs):
        run_dir = RunDir(directory)

        def row_of(keys, scan=scan):  # only for rank files of earlier versions (keys, no scan rows)
            wanted, found = set(keys), {}
            for first in range(0, scan.count, scan.group_rows):
                for i, utt in enumerate(scan.rows(first, first + scan.group_rows)):
                    if utt.key in wanted:
                        found[utt.key] = first + i
            return found
        ranks.append([run_dir.read_rank_results(meta["rank"], row_of) for meta in metas])
        failures += [f for results in ranks[-1] for f in results.failures]
    holder = {}

    def produce(build: Path, names: dict):
        try:
            pieces = streammerge.stream_merge([scan for scan, _, _ in runs], ranks, build, output_dir, formats, names,
                                              speaker_mean, duration_weighted, closest_pairs,
                                              failure_keys={f["key"] for f in failures})
        except streammerge.StreamMergeError as exc:
            raise MergeError(str(exc)) from None
        if pieces["inputs"] != pieces["utterances"] + len(failures) and not problems:
            raise MergeError(f"accounting error: {pieces['inputs']} inputs but {pieces['utterances']} embedded + "
                             f"{len(failures)} failed")
        pieces.update(failures=len(failures), scan_errors=scan_errors, key_renames=key_renames, ignored=ignored,
                      problems=problems)
        summary = run_summary(input_dirs, runs, pieces, formats, speaker_mean, duration_weighted)
        if pieces["kaldi_renamed_keys"]:
            summary["kaldi_renamed_keys"] = pieces["kaldi_renamed_keys"]
        holder["summary"] = summary
        return pieces["files"], summary, sorted(failures, key=lambda f: f["path"]) + scan_errors

    try:
        finaldir.write_streamed(output_dir, produce, _merged_from(input_dirs, runs))
    finally:
        for results in (r for run in ranks for r in run):
            results.close()
    return holder["summary"]


def merge_in_memory(input_dirs, runs, output_dir: Path, formats, speaker_mean, duration_weighted,
                    closest_pairs) -> dict:
    """Everything in memory: for corpora up to STREAM_ABOVE utterances."""
    problems, scan_errors, key_renames, ignored = _run_facts(input_dirs, runs)
    utterances: Dict[str, data_mod.Utterance] = {}
    keys: List[str] = []
    blocks: List[np.ndarray] = []
    extra: Dict[str, dict] = {}
    failures: List[dict] = []
    for directory, (scan, metas, _) in zip(input_dirs, runs):
        for utt in scan.rows():
            if utt.key in utterances and utterances[utt.key].path != utt.path:
                raise MergeError(f"key {utt.key} appears in two runs: {utterances[utt.key].path} and {utt.path}")
            utterances[utt.key] = utt
        for meta in metas:
            rank_keys, matrix, rank_failures, rank_extra = RunDir(directory).read_rank_arrays(meta["rank"])
            extra.update(rank_extra)
            keys += rank_keys
            blocks.append(matrix)
            failures += rank_failures
    if len(set(keys)) != len(keys):
        raise MergeError("the same utterance was embedded twice (overlapping runs?)")
    dims = {b.shape[1] for b in blocks if len(b)}
    if len(dims) > 1:
        raise MergeError(f"embedding dimensions differ between ranks: {sorted(dims)}")
    dim = dims.pop() if dims else 0
    nonempty = [b for b in blocks if len(b)]
    matrix = np.concatenate(nonempty) if nonempty else np.zeros((0, dim), np.float32)
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    keys = [keys[i] for i in order]
    matrix = matrix[order] if len(order) else matrix
    durations = np.array([extra.get(k, {}).get("seconds", utterances[k].duration) for k in keys])

    speaker_keys = sorted({utterances[k].speaker_key for k in keys})
    check_speaker_keys(utterances[k] for k in keys)
    speaker_pos = {s: i for i, s in enumerate(speaker_keys)}
    speaker_index = np.array([speaker_pos[utterances[k].speaker_key] for k in keys], dtype=np.int64)
    speaker_matrix = (speaker_means(matrix, speaker_index, len(speaker_keys), speaker_mean,
                                    durations if duration_weighted else None)
                      if len(keys) else np.zeros((0, dim), np.float32))
    counts = np.bincount(speaker_index, minlength=len(speaker_keys)) if len(keys) else np.zeros(0, int)
    speaker_seconds = (np.bincount(speaker_index, weights=durations, minlength=len(speaker_keys))
                       if len(keys) else np.zeros(0))

    stats = (stats_mod.speaker_statistics(keys, matrix, speaker_index, len(speaker_keys), speaker_mean,
                                          durations if duration_weighted else None) if len(keys) else None)
    pairs = stats_mod.closest_pairs(speaker_matrix, closest_pairs)

    utt_list = []
    for index, (key, seconds) in enumerate(zip(keys, durations)):
        utt = utterances[key]
        record = {"key": key, "dataset": utt.dataset, "speaker_id": utt.speaker, "speaker_key": utt.speaker_key,
                  "utterance_id": utt.utterance, "path": utt.path, "rel_path": utt.rel_path,
                  "duration": round(float(seconds), 4), "sample_rate": utt.sample_rate}
        if utt.start is not None:
            record.update({"start": utt.start, "end": utt.end})
        if extra.get(key, {}).get("chunks"):
            record["chunks"] = extra[key]["chunks"]
        record["speaker_cosine"] = round(float(stats["cosine"][index]), 4)
        utt_list.append(record)
    names = {utterances[k].speaker_key: (utterances[k].dataset, utterances[k].speaker) for k in keys}
    spk_list = []
    for index, spk in enumerate(speaker_keys):
        dataset, speaker = names[spk]
        spk_list.append({"key": spk, "dataset": dataset, "speaker_id": speaker,
                         "num_utterances": int(counts[index]), "duration_s": round(float(speaker_seconds[index]), 3),
                         "mean_cosine": round(float(stats["mean_cosine"][index]), 4),
                         "min_cosine": round(float(stats["min_cosine"][index]), 4),
                         "outliers": stats["outliers"][index]})

    datasets: Dict[str, dict] = {}
    for record in utt_list:
        entry = datasets.setdefault(record["dataset"], {"utterances": 0, "speakers": 0, "duration_s": 0.0,
                                                        "failures": 0})
        entry["utterances"] += 1
        entry["duration_s"] += record["duration"]
    for record in spk_list:
        datasets[record["dataset"]]["speakers"] += 1
    for failure in failures:
        utt = utterances.get(failure["key"])
        if utt is not None:
            datasets.setdefault(utt.dataset, {"utterances": 0, "speakers": 0, "duration_s": 0.0,
                                              "failures": 0})["failures"] += 1
    for entry in datasets.values():
        entry["duration_s"] = round(entry["duration_s"], 3)
    failures.sort(key=lambda f: f["path"])
    pieces = {"utterances": len(keys), "speakers": len(speaker_keys), "dim": dim,
              "total_duration_s": float(durations.sum()), "inputs": len(utterances), "failures": len(failures),
              "scan_errors": scan_errors, "key_renames": key_renames, "ignored": ignored, "datasets": datasets,
              "counts": counts, "stats_view": stats, "problems": problems,
              "closest_speaker_pairs": [[speaker_keys[i], speaker_keys[j], round(min(cos, 1.0), 4)]
                                        for i, j, cos in pairs]}
    summary = run_summary(input_dirs, runs, pieces, formats, speaker_mean, duration_weighted)
    if len(utterances) != len(keys) + len(failures) and not problems:
        raise MergeError(f"accounting error: {len(utterances)} inputs but {len(keys)} embedded + "
                         f"{len(failures)} failed")
    finaldir.write(output_dir, formats, keys, matrix, utt_list, speaker_keys, speaker_matrix, spk_list,
                   failures + scan_errors, summary, _merged_from(input_dirs, runs))
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    formats = None if args.formats is None else [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats or [] if f not in FORMATS]
    if unknown:
        print(f"error: unknown format(s) {unknown}; choose from {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    if args.closest_pairs < 0:
        print("error: --closest_pairs must be >= 0", file=sys.stderr)
        return 2
    try:
        finaldir.check_replaceable(Path(args.output_dir))  # before the work, not after it
        summary = merge([Path(d) for d in args.input_dir], Path(args.output_dir), formats, args.speaker_mean,
                        args.duration_weighted, args.allow_partial, args.closest_pairs)
    except (MergeError, finaldir.FinalDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, read-only: the path and the cause, nothing half-written left
        where = f"cannot write {exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    log.info("merged %d utterances of %d speakers (%d failed) into %s", summary["total_utterances"],
             summary["total_speakers"], summary["failures"], args.output_dir)
    if "npy" in summary["formats"]:
        log.info("wrote %s; load with speakerlab.load_embeddings(%r) (memory-mapped), or "
                 "np.load(.../%s, mmap_mode='r'): row i is line i of %s",
                 ", ".join(summary["files"]), str(args.output_dir), finaldir.NPY["utterance"],
                 finaldir.JSONL["utterance"])
    if summary["failures"]:
        log.warning("%d input files were not embedded: see %s", summary["failures"],
                    Path(args.output_dir) / finaldir.FAILURES)
    if summary["scan_errors"]:
        log.warning("%d paths were not used by the scan (unreadable directories, names that are not UTF-8, "
                    "two files that map to one key): see %s", summary["scan_errors"],
                    Path(args.output_dir) / finaldir.FAILURES)
    if summary["key_renames"]:
        log.warning("%d keys were renamed because different names join into one key: see key_renames in %s",
                    len(summary["key_renames"]), Path(args.output_dir) / finaldir.SUMMARY)
    return 0
