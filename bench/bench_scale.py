#!/usr/bin/env python3
"""Scale benchmark: the scan shared by ranks, a rank's memory, the streamed merge and the mapped API.

Each measured step runs as its own process (wall time; peak RSS = the child's VmHWM, polled):

1. scan: a synthetic tree of ``--files`` tiny valid WAVs (10 ms each: the work per file is the walk
   and the header read). The scan of extraction (``extract.coordinate.shared_scan``: walk on rank 0,
   header reads shared by the ranks, scan file cut into shards) runs with 1 rank, then with 2 ranks
   as two concurrent processes (srun style, no process group); prints how many headers each rank
   read, the wall times and their ratio, and the scan file's size per million files.
2. extract: ``extract_speaker_embeddings.py`` (1 rank, a micro model) over two trees of
   ``--extract_files`` 0.2 s files: the rank's peak RSS per utterance of its shard (the slope).
3. merge: synthetic complete run dirs of ``--small_utterances`` and ``--utterances`` 192-d
   embeddings in ``--ranks`` ranks (written as the rank store writes them), merged with
   ``merge_embeddings.py --formats npy``: wall time, peak RSS, and the memory slope between the two.
4. api: ``speakerlab.load_embeddings`` of the large merged dir plus one ``similar()`` query.

    python bench/bench_scale.py                  # 1M-file tree, 10M-utterance merge: ~1 h, 40 GB of disk
    python bench/bench_scale.py --quick          # 20k files, 200k utterances: a few minutes

Disk: 10M x 192 float32 is 7.7 GB per copy (the ranks' and the merged one), plus the lists.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DIM = 192
PER_SPEAKER = 40


def tiny_wav(rate: int = 16000, samples: int = 160) -> bytes:
    import io
    import soundfile as sf
    buf = io.BytesIO()
    sf.write(buf, (np.arange(samples) % 7 - 3).astype(np.int16), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def build_tree(root: Path, files: int, per_speaker: int = PER_SPEAKER, datasets: int = 4, seconds: float = 0.01) -> None:
    payload = tiny_wav(samples=int(16000 * seconds)) if seconds <= 0.01 else None
    speakers = max(1, -(-files // per_speaker))
    written = 0
    for s in range(speakers):
        folder = root / f"ds{s % datasets}" / f"spk{s:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for u in range(min(per_speaker, files - written)):
            if payload is None:  # audible audio a model can embed
                import soundfile as sf
                rng = np.random.default_rng(written)
                sf.write(str(folder / f"utt{u:04d}.wav"), (0.1 * rng.standard_normal(int(16000 * seconds))), 16000)
            else:
                (folder / f"utt{u:04d}.wav").write_bytes(payload)
            written += 1


def measured(cmd, env=None):
    """Start a process; returns a function that waits for it: (wall s, peak RSS MiB, stdout, stderr)."""
    full = dict(os.environ)
    full["PYTHONPATH"] = str(ROOT) + os.pathsep + full.get("PYTHONPATH", "")
    for key in [k for k in full if k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))]:
        del full[key]
    full.update(env or {})
    started = time.perf_counter()
    out_file, err_file = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    proc = subprocess.Popen([str(c) for c in cmd], env=full, stdout=out_file, stderr=err_file)

    def wait():
        # peak RSS as the child's own high-water mark (VmHWM, polled): ru_maxrss from wait4 also counts
        # the parent's pages the child held between fork and exec (a 1 GB bench parent inflated it)
        hwm = 0.0
        while proc.poll() is None:
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    if line.startswith("VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]) / 1024.0)
            except OSError:
                pass
            time.sleep(0.1)
        status = proc.returncode
        wall = time.perf_counter() - started
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read().decode(errors="replace"), err_file.read().decode(errors="replace")
        if status != 0:
            raise RuntimeError(f"failed: {' '.join(map(str, cmd))}\n{err[-3000:]}")
        return wall, hwm, out, err
    return wait


# --- phases run in their own process -----------------------------------------------------------
def phase_scanrank(args) -> dict:
    """One rank of extraction's scan (rank and world from RANK / WORLD_SIZE, srun-style coordination)."""
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from speakerlab import manifest
    from speakerlab.extract.coordinate import shared_scan
    from speakerlab.extract.options import ExtractOptions
    from speakerlab.extract.runtime import rank_info
    from speakerlab.rundir import RunDir
    rank, world, _, _ = rank_info()
    options = ExtractOptions(output_dir=args._out, data_root=args._root, header_threads=args.header_threads,
                             no_progress=True)
    run_dir = RunDir(args._out)
    run_dir.ensure_writable()
    started = time.perf_counter()
    scan, _, lock = shared_scan(options, manifest.describe_source(args._root), run_dir, rank, world)
    wall = time.perf_counter() - started
    (run_dir.release(lock) if rank == 0 else lock.release())
    return {"rank": rank, "scan_s": wall, "shard": len(scan.utterances), "files": int(scan.meta["count"]),
            "scan_file_bytes": run_dir.scan_path.stat().st_size}


def phase_api(args) -> dict:
    started = time.perf_counter()
    import speakerlab
    emb = speakerlab.load_embeddings(args._out)
    opened = time.perf_counter() - started
    key = emb.keys[len(emb) // 2]
    hits = emb.similar(key, k=10)
    return {"open_s": opened, "open_and_similar_s": time.perf_counter() - started, "utterances": len(emb),
            "top": hits[0].key}


class SyntheticRows:
    """The utterances of a synthetic corpus, made on demand (10M Utterance objects do not fit)."""

    def __init__(self, count: int):
        self.count = count
        self.speakers = max(1, -(-count // PER_SPEAKER))

    def __len__(self):
        return self.count

    def make(self, i: int):
        from speakerlab.data import Utterance
        spk = i // PER_SPEAKER
        # 4 datasets of consecutive speakers: keys sort in row order
        dataset, speaker, utt = f"ds{spk * 4 // self.speakers}", f"spk{spk:07d}", f"utt{i % PER_SPEAKER:04d}"
        return Utterance(key=f"{dataset}_{speaker}_{utt}", dataset=dataset, speaker=speaker, utterance=utt,
                         path=f"/data/corpus/{dataset}/{speaker}/{utt}.wav", rel_path=f"{dataset}/{speaker}/{utt}.wav",
                         sample_rate=16000, num_samples=16000 * (2 + i % 15), channels=1)

    def __iter__(self):
        return (self.make(i) for i in range(self.count))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.make(i) for i in range(*index.indices(self.count))]
        return self.make(index)


def write_run(out: Path, utterances: int, ranks: int) -> float:
    """A complete synthetic run dir (as the rank store leaves it): the scan cut into ``ranks`` shards
    and each rank's npz of random embeddings. Keys sort like the corpus (one dataset prefix per
    speaker, zero-padded numbers), so row i is utterance i."""
    from speakerlab import rankout
    from speakerlab.data import ScanResult
    from speakerlab.rundir import RunDir, scan_fingerprint
    started = time.perf_counter()
    run_dir = RunDir(out)
    run_dir.ensure_writable()
    rows = SyntheticRows(utterances)
    scan = ScanResult("/data/corpus", rows, source={"type": "tree", "path": "/data/corpus"})
    meta = run_dir.save_scan(scan, ranks)
    bounds = meta["shard_bounds"]
    scan.meta = meta
    fingerprint = {"model_sha256": "0" * 64, "model_config": {"obj": "CAMPPlus"}, "features": {"type": "kaldi_fbank"},
                   "dtype": "bf16", "channels": "first", "max_chunk_s": 300.0, "fused": True,
                   **scan_fingerprint(scan), "world_size": ranks}
    rng = np.random.default_rng(0)
    for rank in range(ranks):
        first, last = bounds[rank], bounds[rank + 1]
        keys = [rows.make(i).key for i in range(first, last)]
        seconds = np.array([2 + i % 15 for i in range(first, last)], dtype=np.float64)

        def blocks(n=last - first):
            for start in range(0, n, 65536):
                yield rng.standard_normal((min(65536, n - start), DIM), dtype=np.float32)
        store = run_dir.store(rank)
        store.dir.mkdir(parents=True, exist_ok=True)
        rankout.write_rank_arrays(run_dir.rank_embeddings_path(rank), keys, np.arange(first, last), DIM, blocks(),
                                  seconds, np.ones(last - first, np.int32), [])
        store.write_metadata({
            "rank": rank, "world_size": ranks, "complete": True, "fingerprint": dict(fingerprint, rank=rank),
            "run_id": "synthetic", "model": {"name": "synthetic", "checkpoint": "none", "sha256": "0" * 64, "config": {}},
            "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T01:00:00+00:00",
            "command": ["synthetic"], "device": "cpu", "dtype": "bf16", "versions": {}, "batch_policy": {},
            "counts": {"assigned": last - first, "embedded": last - first, "failed": 0},
            "embedding_dimension": DIM, "failures": []})
    return time.perf_counter() - started


def keys_sorted_check(count: int) -> None:
    rows = SyntheticRows(count)
    sample = [rows.make(i).key for i in range(0, count, max(1, count // 1000))]
    assert sample == sorted(sample), "synthetic keys must sort in row order"


def per_million(value: float, n: int) -> float:
    return value * 1e6 / max(1, n)


# --- the measurements ------------------------------------------------------------------------
def bench_scan(args, work: Path) -> dict:
    tree = work / "tree"
    t = time.perf_counter()
    if not tree.is_dir():
        build_tree(tree, args.files)
    print(f"scan: tree of {args.files} files written in {time.perf_counter() - t:.1f} s", flush=True)
    if args.drop_caches:
        subprocess.run(["sync"])
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    report = {"files": args.files, "header_threads": args.header_threads, "cold_cache": args.drop_caches}
    for world in (1, 2):
        out = work / f"scan_run_{world}"
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        waits = [measured([sys.executable, __file__, "--_phase", "scanrank", "--_root", tree, "--_out", out,
                           "--header_threads", args.header_threads],
                          {"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                           "SPEAKERLAB_RUN_ID": f"bench-scan-{world}"}) for r in range(world)]
        results = [w() for w in waits]
        wall = time.perf_counter() - started
        ranks = []
        for (_, rss, out_text, err_text) in results:
            info = json.loads(out_text.strip().splitlines()[-1])
            read = [int(line.split("read the headers of ")[1].split(" ")[0]) for line in err_text.splitlines()
                    if "read the headers of" in line]
            info.update(peak_rss_mib=rss, headers_read=sum(read) if world > 1 else info["files"])
            ranks.append(info)
        size = ranks[0]["scan_file_bytes"]
        report[f"world_{world}"] = {"wall_s": wall, "ranks": ranks, "per_million_files_s": per_million(wall, args.files)}
        print(f"scan, {world} rank(s): {wall:.1f} s ({per_million(wall, args.files):.0f} s per million files); "
              + "; ".join(f"rank {r['rank']} read {r['headers_read']} headers, shard {r['shard']}, "
                          f"peak {r['peak_rss_mib']:.0f} MiB" for r in ranks), flush=True)
        report["scan_file_mib_per_million"] = per_million(size / 2 ** 20, args.files)
        shutil.rmtree(out, ignore_errors=True)
    report["ratio_2_to_1"] = report["world_2"]["wall_s"] / report["world_1"]["wall_s"]
    print(f"scan: 2 ranks take {report['ratio_2_to_1']:.2f}x the time of 1; scan file "
          f"{report['scan_file_mib_per_million']:.1f} MiB per million files", flush=True)
    if not args.keep_tree:
        shutil.rmtree(tree, ignore_errors=True)
    return report


def bench_extract(args, work: Path) -> dict:
    from tests.helpers import micro_model
    model = micro_model(work / "micro_model")
    points = []
    for files in args.extract_files:
        tree, out = work / f"extract_tree_{files}", work / f"extract_out_{files}"
        shutil.rmtree(out, ignore_errors=True)
        if not tree.is_dir():
            build_tree(tree, files, seconds=0.2)
        wall, rss, _, _ = measured([sys.executable, ROOT / "extract_speaker_embeddings.py", "--data_root", tree,
                                    "--output_dir", out, *model, "--num_workers", "0", "--no_progress",
                                    "--dtype", "fp32"])()
        points.append({"files": files, "wall_s": wall, "peak_rss_mib": rss})
        print(f"extract: {files} files, 1 rank: {wall:.1f} s, peak {rss:.0f} MiB", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(tree, ignore_errors=True)
    (a, b) = points[0], points[-1]
    slope = (b["peak_rss_mib"] - a["peak_rss_mib"]) * 2 ** 20 / max(1, b["files"] - a["files"])
    print(f"extract: peak RSS slope {slope:.0f} bytes per utterance of the rank's shard", flush=True)
    return {"points": points, "rss_slope_bytes_per_utterance": slope}


def bench_merge(args, work: Path) -> dict:
    points = []
    for count in (args.small_utterances, args.utterances):
        keys_sorted_check(count)
        run, final = work / f"run_{count}", work / f"final_{count}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        gen = write_run(run, count, args.ranks)
        print(f"merge: {count} synthetic utterances in {args.ranks} ranks written in {gen:.1f} s", flush=True)
        wall, rss, _, err = measured([sys.executable, ROOT / "merge_embeddings.py", "--input_dir", run,
                                      "--output_dir", final, "--formats", "npy"])()
        from speakerlab.finaldir import FinalDir
        summary = FinalDir.open(final).summary()
        assert summary["total_utterances"] == count, summary["total_utterances"]
        sizes = {f.name: round(f.stat().st_size / 2 ** 20, 1) for f in final.iterdir() if f.is_file()}
        points.append({"utterances": count, "ranks": args.ranks, "wall_s": wall, "peak_rss_mib": rss,
                       "per_million_utterances_s": per_million(wall, count), "output_mib": sizes,
                       "generate_s": gen})
        print(f"merge --formats npy: {count} utterances, {args.ranks} ranks: {wall:.1f} s "
              f"({per_million(wall, count):.0f} s per million), peak {rss:.0f} MiB", flush=True)
        shutil.rmtree(run, ignore_errors=True)
        if count != args.utterances:
            shutil.rmtree(final, ignore_errors=True)
    (a, b) = points[0], points[-1]
    slope = (b["peak_rss_mib"] - a["peak_rss_mib"]) * 2 ** 20 / max(1, b["utterances"] - a["utterances"])
    print(f"merge: peak RSS slope {slope:.1f} bytes per utterance", flush=True)
    return {"points": points, "rss_slope_bytes_per_utterance": slope, "final": str(work / f"final_{args.utterances}")}


def bench_api(args, final: Path) -> dict:
    wall, rss, out, _ = measured([sys.executable, __file__, "--_phase", "api", "--_out", final])()
    info = json.loads(out.strip().splitlines()[-1])
    info.update(process_wall_s=wall, peak_rss_mib=rss)
    print(f"api: load_embeddings + one similar() over {info['utterances']} utterances: "
          f"{info['open_and_similar_s']:.2f} s in the process ({wall:.2f} s with start-up), peak {rss:.0f} MiB",
          flush=True)
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=None, help="files in the scan tree (default 1000000; quick 20000)")
    p.add_argument("--utterances", type=int, default=None, help="large merge (default 10000000; quick 200000)")
    p.add_argument("--small_utterances", type=int, default=None, help="small merge, for the slope (default 1000000)")
    p.add_argument("--ranks", type=int, default=16)
    p.add_argument("--extract_files", type=int, nargs=2, default=None, help="two tree sizes (default 2000 20000)")
    p.add_argument("--header_threads", type=int, default=16)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip", nargs="*", default=[], choices=["scan", "extract", "merge", "api"])
    p.add_argument("--drop_caches", action="store_true", help="drop the page cache before the scan (root)")
    p.add_argument("--keep_tree", action="store_true", help="keep the scan tree in --workdir for a rerun")
    p.add_argument("--workdir", default=None, help="scratch dir (default: a temporary dir, removed)")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "scale.json"))
    p.add_argument("--_phase", help=argparse.SUPPRESS)
    p.add_argument("--_root", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._phase:
        print(json.dumps({"scanrank": phase_scanrank, "api": phase_api}[args._phase](args)))
        return 0
    args.files = args.files or (20000 if args.quick else 1000000)
    args.utterances = args.utterances or (200000 if args.quick else 10000000)
    args.small_utterances = args.small_utterances or (50000 if args.quick else 1000000)
    args.extract_files = args.extract_files or ([300, 1500] if args.quick else [2000, 20000])
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="speakerlab_scale_")
        work = Path(tmp.name)
    report = {"machine": {"cpu_cores": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
                          "load_average_at_start": os.getloadavg()},
              "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        if "scan" not in args.skip:
            report["scan"] = bench_scan(args, work)
        if "extract" not in args.skip:
            report["extract"] = bench_extract(args, work)
        if "merge" not in args.skip:
            report["merge"] = bench_merge(args, work)
            if "api" not in args.skip:
                report["api"] = bench_api(args, Path(report["merge"]["final"]))
    finally:
        report["machine"]["load_average_at_end"] = os.getloadavg()
        if tmp is not None:
            tmp.cleanup()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
