#!/usr/bin/env python3
"""Scale benchmark: tree scan + header reads, scan.json save/load, and the merge, per million files.

1. scan: builds a synthetic tree of ``--files`` tiny valid WAVs (10 ms each: the work per file is
   the directory walk and the header read, not the audio), then times, in a fresh process,
   ``scan_tree`` -> ``read_headers`` (``--header_threads``) -> ``save_scan``, and ``load_scan``
   (what a resumed run or the merge does), with the process's peak memory.
2. merge: writes ``--utterances`` synthetic utterance embeddings (192-d float32) as ``--ranks``
   complete rank dirs as ``speakerlab/rundir.py`` writes them (each rank's embeddings, pickles and
   metadata, the scan beside them), then runs ``merge_embeddings.py`` as a whole
   process (default formats pkl,npz) and reports its wall time and peak memory.

Smaller runs are extrapolated linearly to one million files (all steps are O(n) or O(n log n)).
The tree is freshly written, so the scan runs on a warm page cache unless ``--drop_caches``
(root; drops the whole machine's cache) is given; on network file systems the header reads are
I/O bound and ``--header_threads`` matters more.

    python bench/bench_scale.py                      # 50k-file tree, 1M-utterance merge
    python bench/bench_scale.py --quick              # 5k files, 100k utterances
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


def tiny_wav(rate: int = 16000, samples: int = 160) -> bytes:
    import io
    import soundfile as sf
    buf = io.BytesIO()
    sf.write(buf, (np.arange(samples) % 7 - 3).astype(np.int16), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def build_tree(root: Path, files: int, per_speaker: int = 40, datasets: int = 4) -> None:
    payload = tiny_wav()
    speakers = max(1, files // per_speaker)
    written = 0
    for s in range(speakers):
        folder = root / f"ds{s % datasets}" / f"spk{s:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for u in range(per_speaker if s < speakers - 1 else files - written):
            (folder / f"utt{u:04d}.wav").write_bytes(payload)
            written += 1


def run_measured(cmd):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    started = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"failed: {' '.join(map(str, cmd))}\n{err.decode()[-3000:]}")
    return wall, usage.ru_maxrss / 1024.0, out.decode(), err.decode()


def phase_scan(args) -> dict:
    """Runs in its own process: the scan as extract.coordinate.prepare_scan does it."""
    from speakerlab import data as data_mod
    timings = {}
    t = time.perf_counter()
    scan = data_mod.scan_tree(args._root)
    timings["walk_s"] = time.perf_counter() - t
    t = time.perf_counter()
    data_mod.read_headers(scan.utterances, args.header_threads)
    timings["headers_s"] = time.perf_counter() - t
    bad = sum(1 for u in scan.utterances if u.header_error)
    path = Path(args._out)
    t = time.perf_counter()
    data_mod.save_scan(scan, path)
    timings["save_scan_s"] = time.perf_counter() - t
    t = time.perf_counter()
    again = data_mod.load_scan(path)
    timings["load_scan_s"] = time.perf_counter() - t
    assert len(again.utterances) == len(scan.utterances)
    timings.update({"files": len(scan.utterances), "header_errors": bad,
                    "scan_json_mib": path.stat().st_size / 2 ** 20})
    return timings


def write_ranks(out: Path, utterances: int, ranks: int, dim: int = 192, per_speaker: int = 40) -> float:
    """Synthetic complete extraction output dir, as RankStore.finalize leaves it."""
    from speakerlab import data as data_mod
    from speakerlab.rundir import RunDir, scan_fingerprint
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    utts = []
    for i in range(utterances):
        spk = i // per_speaker
        dataset, speaker, utt = f"ds{spk % 4}", f"spk{spk:06d}", f"utt{i % per_speaker:04d}"
        utts.append(data_mod.Utterance(
            key=f"{dataset}_{speaker}_{utt}", dataset=dataset, speaker=speaker, utterance=utt,
            path=f"/data/corpus/{dataset}/{speaker}/{utt}.wav", rel_path=f"{dataset}/{speaker}/{utt}.wav",
            sample_rate=16000, num_samples=16000 * (2 + i % 15), channels=1))
    utts.sort(key=lambda u: u.key)
    scan = data_mod.ScanResult("/data/corpus", utts, source={"type": "tree", "path": "/data/corpus"})
    run_dir = RunDir(out)
    run_dir.save_scan(scan)
    shard_of = [[] for _ in range(ranks)]
    for i, utt in enumerate(utts):  # duration-balanced in a real run; round robin is as good here
        shard_of[i % ranks].append(utt)
    rng = np.random.default_rng(0)
    fingerprint = {"model_sha256": "0" * 64, "model_config": {"obj": "CAMPPlus"}, "features": {"type": "kaldi_fbank"},
                   "dtype": "bf16", "channels": "first", "max_chunk_s": 300.0, "fused": True,
                   **scan_fingerprint(scan), "world_size": ranks}
    for rank, shard in enumerate(shard_of):
        store = run_dir.store(rank)
        store.dir.mkdir(exist_ok=True)
        store.keys = [u.key for u in shard]
        store.embeddings = list(rng.standard_normal((len(shard), dim), dtype=np.float32))
        store.extra = {u.key: {"seconds": u.duration} for u in shard}
        store.finalize({u.key: u for u in shard}, {
            "rank": rank, "world_size": ranks, "complete": True, "fingerprint": dict(fingerprint, rank=rank),
            "run_id": "synthetic",
            "model": {"name": "synthetic", "checkpoint": "none", "sha256": "0" * 64, "config": {}},
            "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T01:00:00+00:00",
            "command": ["synthetic"], "device": "cpu", "dtype": "bf16", "versions": {},
            "batch_policy": {}, "counts": {"assigned": len(shard), "embedded": len(shard), "failed": 0},
            "embedding_dimension": dim, "failures": []})
    return time.perf_counter() - started


def per_million(seconds: float, n: int) -> float:
    return seconds * 1e6 / max(1, n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=None, help="files in the scan tree (default 50000; quick 5000)")
    p.add_argument("--utterances", type=int, default=None, help="utterances merged (default 1000000; quick 100000)")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--header_threads", type=int, default=16)
    p.add_argument("--formats", default="pkl,npz", help="merge output formats")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip_scan", action="store_true")
    p.add_argument("--skip_merge", action="store_true")
    p.add_argument("--drop_caches", action="store_true", help="drop the page cache before the scan (root)")
    p.add_argument("--workdir", default=None, help="scratch dir (default: a temporary dir, removed)")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "scale.json"))
    p.add_argument("--_phase", help=argparse.SUPPRESS)
    p.add_argument("--_root", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._phase == "scan":
        print(json.dumps(phase_scan(args)))
        return 0
    files = args.files or (5000 if args.quick else 50000)
    utterances = args.utterances or (100000 if args.quick else 1000000)
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="speakerlab_scale_")
        work = Path(tmp.name)
    report = {"machine": {"cpu_cores": len(os.sched_getaffinity(0)), "python": sys.version.split()[0]},
              "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        if not args.skip_scan:
            tree = work / "tree"
            t = time.perf_counter()
            if not tree.is_dir():
                build_tree(tree, files)
            print(f"scan: tree of {files} files written in {time.perf_counter() - t:.1f} s", flush=True)
            if args.drop_caches:
                subprocess.run(["sync"])
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
            wall, rss, out, _ = run_measured([sys.executable, __file__, "--_phase", "scan", "--_root", tree,
                                              "--_out", work / "scan.json",
                                              "--header_threads", args.header_threads])
            scan = json.loads(out.strip().splitlines()[-1])
            scan.update({"process_wall_s": wall, "peak_rss_mib": rss, "cold_cache": args.drop_caches,
                         "header_threads": args.header_threads})
            n = scan["files"]
            scan["per_million_files_s"] = {k[:-2]: round(per_million(scan[k], n), 1)
                                           for k in ("walk_s", "headers_s", "save_scan_s", "load_scan_s")}
            scan["per_million_files_s"]["total_first_run"] = round(
                per_million(scan["walk_s"] + scan["headers_s"] + scan["save_scan_s"], n), 1)
            scan["per_million_scan_json_mib"] = round(per_million(scan["scan_json_mib"], n), 1)
            report["scan"] = scan
            pm = scan["per_million_files_s"]
            print(f"scan: {n} files: walk {scan['walk_s']:.2f} s, headers {scan['headers_s']:.2f} s, "
                  f"save {scan['save_scan_s']:.2f} s, load {scan['load_scan_s']:.2f} s; peak {rss:.0f} MiB\n"
                  f"      per million files: walk {pm['walk']:.0f} s + headers {pm['headers']:.0f} s + "
                  f"save {pm['save_scan']:.0f} s = {pm['total_first_run']:.0f} s first run; "
                  f"reuse (load scan.json) {pm['load_scan']:.0f} s; scan.json "
                  f"{scan['per_million_scan_json_mib']:.0f} MiB", flush=True)
            shutil.rmtree(tree, ignore_errors=True)
        if not args.skip_merge:
            ranks_dir = work / "ranks"
            gen = write_ranks(ranks_dir, utterances, args.ranks)
            print(f"merge: {utterances} synthetic utterances in {args.ranks} ranks written in {gen:.1f} s",
                  flush=True)
            wall, rss, _, _ = run_measured([sys.executable, ROOT / "merge_embeddings.py", "--input_dir", ranks_dir,
                                            "--output_dir", work / "final", "--formats", args.formats])
            from speakerlab.finaldir import FinalDir
            summary = FinalDir.open(work / "final").summary()
            assert summary["total_utterances"] == utterances, summary["total_utterances"]
            sizes = {f.name: round(f.stat().st_size / 2 ** 20, 1) for f in (work / "final").iterdir() if f.is_file()}
            report["merge"] = {"utterances": utterances, "ranks": args.ranks, "formats": args.formats,
                               "process_wall_s": wall, "peak_rss_mib": rss,
                               "per_million_utterances_s": round(per_million(wall, utterances), 1),
                               "output_mib": sizes, "generate_s": gen}
            print(f"merge: {utterances} utterances, {args.ranks} ranks, formats {args.formats}: {wall:.1f} s "
                  f"whole process ({per_million(wall, utterances):.0f} s per million), peak {rss:.0f} MiB",
                  flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
