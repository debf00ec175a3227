#!/usr/bin/env python3
"""The prepared GPU check (issue 15): one command, under 8 minutes on one H100/H200.

    bash bench/gpu_check.sh                 # on a GPU node (installs carried wheels first, if any)
    python bench/gpu_check.py --dry_run     # tiny sizes on CPU: what CI runs so this cannot rot

It synthesises speech-like audio of varied lengths (mostly 2-20 s, some 0.6-2 s and 20-60 s; 16 kHz
with some 8 / 44.1 kHz and stereo), links it into a corpus of hours, and for CAM++ and ERes2NetV2
prints:

* the pipeline's steady-state x real time (extract_speaker_embeddings.py on the GPU, from the
  rank's ``timing``: audio after the first batch over the time since, start-up excluded);
* the model-only ceiling on the very batch shapes the pipeline makes (bench_throughput.same_shapes_ceiling)
  and the ratio, against the targets (ERes2NetV2 >= 0.7, CAM++ >= 0.5);
* GPU utilisation over the steady window (nvidia-smi samples) and peak GPU memory (the rank's own);
* the min cosine of the pipeline's bf16 embeddings to fp32 (exact, no TF32) on the GPU (>= 0.999).

Then: 2 ranks sharing one GPU (torchrun, ``--gpu 0 0``) give the same embeddings as 1 rank, and an
out-of-memory forced by capping the allocator between a half batch's and a whole batch's peak is
split once with every file embedded. Exit status 0 when every check passes.

CAM++ uses the released zh/en weights when they are in the speakerlab cache (``SPEAKERLAB_CACHE``;
gpu_check.sh points it at ``.gpu_assets/`` if that holds them), else a random init; ERes2NetV2 is
full size with random weights (speed does not depend on the weights).
"""
import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import wave as wavefile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_throughput import draw_duration, random_eres2netv2, same_shapes_ceiling, speechlike  # noqa: E402

TARGETS = {"eres2netv2": 0.7, "campplus": 0.5}   # pipeline steady / model-only ceiling
MIN_COSINE = 0.999                                # bf16 pipeline vs fp32 on the GPU
RANKS_MIN_COSINE = 0.9999                         # fp32, 2 ranks vs 1: only batch composition differs
CONFIGS = {"campplus": "conf/campplus.yaml", "eres2netv2": "conf/eres2netv2.yaml"}
SIZES = {  # unique audio (s), corpus hours per model, files in the rank / cosine / OOM checks
    # GPU: each model's corpus is sized from its measured ceiling so the pipeline has ~25 s of model
    # work in its steady window (at most ``hours``): enough for a steady rate, and the whole check
    # stays under 8 minutes however fast the GPU is
    "gpu": {"unique_s": 5400.0, "hours": {"campplus": 150.0, "eres2netv2": 40.0}, "model_s": 25.0,
            "rank_files": 160, "cos_files": 256, "oom_batch": 256, "time_limit_s": 450.0},
    "dry": {"unique_s": 12.0, "hours": {"campplus": 0.006, "eres2netv2": 0.003},
            "rank_files": 4, "cos_files": 4, "oom_batch": 4, "time_limit_s": 600.0,
            "extract_args": ["--batch_frames", "400"]},  # several batches even here: a steady rate
}


# ---------------------------------------------------------------------------------- corpus
def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    """16-bit PCM WAV with the standard library (the check needs no audio package to write)."""
    data = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wavefile.open(str(path), "wb") as out:
        out.setnchannels(1 if data.ndim == 1 else data.shape[1])
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(data.tobytes())


def _synth(job) -> float:
    path, seconds, rate, channels, seed = job
    rng = np.random.default_rng(seed)
    samples = speechlike(seconds, rate, rng)
    if channels == 2:
        samples = np.stack([samples, 0.6 * samples + 0.01 * rng.standard_normal(len(samples)).astype(np.float32)], 1)
    write_wav(Path(path), samples, rate)
    return len(samples) / rate


def build_unique(root: Path, total_s: float, seed: int, dry: bool) -> list:
    """Distinct clips under root/synth/<speaker>/: [(path, seconds)], in parallel."""
    rng = np.random.default_rng(seed)
    jobs, planned = [], 0.0
    while planned < total_s:
        seconds = float(rng.uniform(0.8, 4.0)) if dry else draw_duration(rng)
        rate = int(rng.choice([16000, 8000, 44100], p=[0.9, 0.05, 0.05]))
        channels = 2 if rng.random() < 0.05 else 1
        path = root / "synth" / f"spk{len(jobs) % 40:03d}" / f"utt{len(jobs):05d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(path), seconds, rate, channels, seed * 100003 + len(jobs)))
        planned += seconds
    workers = max(1, min(16, os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as pool:
        durations = list(pool.map(_synth, jobs, chunksize=8))
    return [(Path(job[0]), seconds) for job, seconds in zip(jobs, durations)]


def link_corpus(clips: list, root: Path, hours: float) -> dict:
    """root/synth/<speaker>/<utt>_cK.wav: the clips again and again (hard links, page-cached) up to
    ``hours``; each link is a file of its own to the pipeline."""
    if root.exists():
        shutil.rmtree(root)
    total, files, copy = 0.0, 0, 0
    while total < hours * 3600 or copy == 0:
        for path, seconds in clips:
            target = root / path.parent.relative_to(path.parent.parent.parent) / f"{path.stem}_c{copy}.wav"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)
            total += seconds
            files += 1
            if total >= hours * 3600 and copy > 0:
                break
        copy += 1
    return {"files": files, "audio_h": round(total / 3600, 3), "copies": copy}


# ---------------------------------------------------------------------------------- GPU sampling
class GpuSampler:
    """nvidia-smi's utilisation and memory every 100 ms, time-stamped here."""

    def __init__(self, index: int):
        self.samples = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "-i", str(index), "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                util, used = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), util, used))

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def utilisation(self, start: float, end: float):
        values = [u for t, u, _ in self.samples if start <= t <= end]
        return round(sum(values) / len(values), 1) if values else None


# ---------------------------------------------------------------------------------- runs
def env_with_repo() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def extract_cmd(data_root, output_dir, model_path, config, cuda: bool, extra=()):
    cmd = [str(ROOT / "extract_speaker_embeddings.py"), "--data_root", str(data_root), "--output_dir",
           str(output_dir), "--model_path", str(model_path), "--config_file", str(ROOT / config),
           "--no_progress", "--overwrite"]
    return cmd + (["--use_gpu"] if cuda else []) + list(extra)


def run(cmd, what: str, timeout: float) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env_with_repo(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def rank_embeddings(output_dir: Path) -> dict:
    out = {}
    for rank_dir in sorted(output_dir.glob("rank_*")):
        with np.load(rank_dir / "embeddings.npz") as data:
            out.update(zip(data["keys"].tolist(), data["embeddings"].astype(np.float64)))
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def model_file(name: str, workdir: Path):
    if name == "campplus":
        from speakerlab import zoo
        cached = zoo.cache_dir() / zoo.DEFAULT_MODEL.name
        if cached.is_file():  # never download here: a GPU node may be offline
            return zoo.default_model_path(), "released weights"
    return random_eres2netv2(workdir / f"{name}_random_init.ckpt", str(ROOT / CONFIGS[name])), "random init"


# ---------------------------------------------------------------------------------- checks
def check_model(name, args, sizes, clips, workdir, device, sampler) -> dict:
    import torch
    from speakerlab.audio import load_audio
    from speakerlab.config import load_config
    from speakerlab.embedder import Embedder, default_batch_frames, resolve_dtype
    from speakerlab.models import load_model
    cuda = device.type == "cuda"
    model_path, weights = model_file(name, workdir)
    config = load_config(ROOT / CONFIGS[name])
    sr = config.sample_rate
    embedder = Embedder(load_model(config, model_path), config, device, dtype=resolve_dtype("auto", device))
    hours = sizes["hours"][name]
    probe = None
    if "model_s" in sizes:  # size the corpus from the ceiling on the distinct clips' shapes
        lengths = [int(seconds * sr) for _, seconds in clips]
        probe = same_shapes_ceiling(embedder, lengths, embedder.batch_frames(None), None)
        hours = min(hours, max(1.0, sizes["model_s"] * probe["x_real_time"] / 3600))
        if cuda:
            torch.cuda.empty_cache()
    corpus = workdir / f"corpus_{name}"
    info = link_corpus(clips, corpus, hours)
    out_dir = workdir / f"out_{name}"
    extra = (["--gpu", str(device.index or 0)] if cuda else []) + sizes.get("extract_args", [])
    wall = run([sys.executable] + extract_cmd(corpus, out_dir, model_path, CONFIGS[name], cuda, extra),
               f"{name} pipeline", timeout=sizes["time_limit_s"])
    meta = json.loads((out_dir / "rank_00" / "metadata.json").read_text())
    timing = meta.get("timing") or {}
    result = {"model": name, "weights": weights, "corpus": info, "process_wall_s": round(wall, 1),
              "probe_ceiling_x_real_time": round(probe["x_real_time"], 1) if probe else None,
              "dtype": meta["dtype"], "embedded": meta["counts"]["embedded"], "failed": meta["counts"]["failed"],
              "batch_policy": meta.get("batch_policy"), "timing": timing,
              "pipeline_x_real_time": timing.get("steady_x_real_time"),
              "whole_process_x_real_time": round(info["audio_h"] * 3600 / wall, 1),
              "peak_gpu_memory_mib": timing.get("gpu_max_reserved_mib"),
              "gpu_utilisation_pct": sampler.utilisation(timing.get("steady_start_unix", 0),
                                                         timing.get("steady_end_unix", 0)) if sampler else None}

    from speakerlab.data import load_scan
    lengths = [int(u.num_samples * sr / u.sample_rate) for u in load_scan(out_dir / "scan.json").utterances]
    ceiling = same_shapes_ceiling(embedder, lengths, meta["batch_policy"]["batch_frames"],
                                  meta["batch_policy"].get("batch_size"))
    result["ceiling"] = ceiling
    result["ceiling_x_real_time"] = round(ceiling["x_real_time"], 1)
    if result["pipeline_x_real_time"]:
        result["ratio"] = round(result["pipeline_x_real_time"] / ceiling["x_real_time"], 3)
    result["target"] = TARGETS[name]
    if args.cudnn_benchmark and cuda:  # cuDNN autotuning per shape: its gain, and its set-up cost per shape
        torch.backends.cudnn.benchmark = True
        try:
            tuned = same_shapes_ceiling(embedder, lengths, meta["batch_policy"]["batch_frames"],
                                        meta["batch_policy"].get("batch_size"))
        finally:
            torch.backends.cudnn.benchmark = False
        result["ceiling_cudnn_benchmark"] = tuned
        print(f"[{name}] ceiling with cudnn.benchmark: {tuned['x_real_time']:.1f}x (vs {ceiling['x_real_time']:.1f}x), "
              f"warm-up over {tuned['shapes']} shapes {tuned['warm_up_s']} s (vs {ceiling['warm_up_s']} s)", flush=True)

    # bf16 pipeline vs fp32 on this device, on the first clips (copy 0 of each)
    exact = Embedder(load_model(config, model_path), config, device, dtype="fp32")
    ours = rank_embeddings(out_dir)
    chosen = clips[:sizes["cos_files"]]
    waves = [load_audio(str(p), sr) for p, _ in chosen]
    order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
    worst, budget = 1.0, max(3000, default_batch_frames(device, exact.model) // 4)
    batch, groups = [], []
    for i in order:
        if batch and (len(batch) + 1) * len(waves[i]) // 160 > budget:
            groups.append(batch)
            batch = []
        batch.append(i)
    if batch:
        groups.append(batch)
    compared = 0
    for group in groups:
        for i, res in zip(group, exact.embed_waves([waves[i] for i in group])):
            path = chosen[i][0]
            key = f"synth_{path.parent.name}_{path.stem}_c0"
            if res.embedding is not None and key in ours:
                worst = min(worst, cosine(ours[key], res.embedding.astype(np.float64)))
                compared += 1
    result["min_cosine_to_fp32"] = round(worst, 6)
    result["cosine_files"] = compared
    del embedder, exact
    if cuda:
        torch.cuda.empty_cache()
    return result


def check_two_ranks(args, sizes, clips, workdir, device) -> dict:
    """torchrun, 2 ranks sharing one GPU (--gpu 0 0, deliberate) vs 1 rank, fp32: same keys, same vectors."""
    cuda = device.type == "cuda"
    model_path, _ = model_file("campplus", workdir)
    subset = workdir / "corpus_ranks"
    link_corpus(clips[:sizes["rank_files"]], subset, 0.0)
    one, two = workdir / "out_rank1", workdir / "out_rank2"
    gpu = str(device.index or 0)
    run([sys.executable] + extract_cmd(subset, one, model_path, CONFIGS["campplus"], cuda,
                                       ["--dtype", "fp32"] + (["--gpu", gpu] if cuda else [])),
        "1-rank run", timeout=sizes["time_limit_s"])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + extract_cmd(subset, two, model_path, CONFIGS["campplus"], cuda,
                      ["--dtype", "fp32"] + (["--gpu", gpu, gpu] if cuda else [])),
        "2-rank run", timeout=sizes["time_limit_s"])
    a, b = rank_embeddings(one), rank_embeddings(two)
    common = sorted(set(a) & set(b))
    worst = min((cosine(a[k], b[k]) for k in common), default=0.0)
    return {"files": len(a), "same_keys": set(a) == set(b), "ranks": len(list(two.glob("rank_*"))),
            "min_cosine": round(worst, 7), "passed": set(a) == set(b) and len(a) > 0 and worst >= RANKS_MIN_COSINE}


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def check_oom(args, sizes, clips, workdir, device) -> dict:
    """A whole batch that does not fit but whose halves do: one split, every row embedded, the same
    embeddings. On CUDA the allocator is capped between the two peaks (set_per_process_memory_fraction);
    on CPU (dry run) the model is made to raise out-of-memory above half the batch."""
    import torch
    from speakerlab.audio import load_audio
    from speakerlab.config import load_config
    from speakerlab.embedder import Embedder, default_dtype
    from speakerlab.models import load_model
    config = load_config(ROOT / CONFIGS["campplus"])
    model_path, _ = model_file("campplus", workdir)
    embedder = Embedder(load_model(config, model_path), config, device, dtype=default_dtype(device))
    seconds = 8.0 if device.type == "cuda" else 1.5
    base = [w for w in (load_audio(str(p), config.sample_rate) for p, s in clips) if len(w) >= seconds * config.sample_rate]
    if not base:
        return {"passed": False, "reason": "no clip long enough"}
    count = sizes["oom_batch"]
    waves = [base[i % len(base)][:int(seconds * config.sample_rate)] for i in range(count)]  # one shape: halves alike
    want = embedder.embed_waves(waves)
    handler = _Warnings()
    logging.getLogger("speakerlab").addHandler(handler)
    try:
        if device.type == "cuda":
            def peak(n):
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                embedder.embed_waves(waves[:n])
                torch.cuda.synchronize(device)
                return torch.cuda.max_memory_reserved(device)
            whole, half = peak(count), peak(count // 2)
            cap = (whole + half) / 2
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(cap / total, device)
            try:
                got = embedder.embed_waves(waves)
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
            detail = {"peak_whole_mib": round(whole / 2 ** 20), "peak_half_mib": round(half / 2 ** 20),
                      "cap_mib": round(cap / 2 ** 20)}
        else:
            forward = embedder.model.forward

            def limited(x, lengths=None):
                if x.shape[0] > count // 2:
                    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
                return forward(x, lengths)
            embedder.model.forward = limited
            got = embedder.embed_waves(waves)
            detail = {"simulated": True}
    finally:
        logging.getLogger("speakerlab").removeHandler(handler)
    splits = sum("out of memory" in m for m in handler.messages)
    embedded = sum(r.embedding is not None for r in got)
    worst = min(cosine(g.embedding.astype(np.float64), w.embedding.astype(np.float64))
                for g, w in zip(got, want) if g.embedding is not None and w.embedding is not None) if embedded else 0.0
    return {"batch": count, "splits": splits, "embedded": embedded, "min_cosine_to_unsplit": round(worst, 6),
            "passed": splits == 1 and embedded == count and worst >= MIN_COSINE, **detail}


# ---------------------------------------------------------------------------------- report
def show(value, fmt="{:.1f}"):
    return "n/a" if value is None else fmt.format(value)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry_run", action="store_true", help="tiny sizes on CPU (what CI runs)")
    p.add_argument("--device", default=None, help="default: cuda:0 (cpu with --dry_run)")
    p.add_argument("--models", default="campplus,eres2netv2")
    p.add_argument("--hours", type=float, default=None, help="corpus hours for every model (default: per model)")
    p.add_argument("--workdir", default=None, help="scratch dir (default: a temporary one, removed)")
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--cudnn_benchmark", action="store_true",
                   help="also measure the ceiling with cuDNN autotuning (off in the pipeline: unmeasured)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    import torch
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda:0"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here (use --dry_run for the CPU rehearsal)", file=sys.stderr)
        return 2
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)  # the memory statistics and caps below read the current device
    if device.type == "cpu":  # one thread, as each of the pipeline's CPU streams (threads stall on a busy CPU)
        torch.set_num_threads(1)
    sizes = SIZES["dry" if args.dry_run else "gpu"]
    if args.hours is not None:
        sizes = {**sizes, "hours": {k: args.hours for k in sizes["hours"]}}
    started = time.perf_counter()
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        import tempfile
        tmp = tempfile.TemporaryDirectory(prefix="speakerlab_gpu_check_")
        workdir = Path(tmp.name)
    machine = {"torch": torch.__version__, "device": str(device), "dry_run": args.dry_run}
    if device.type == "cuda":
        machine.update({"gpu": torch.cuda.get_device_name(device),
                        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
                        "cpu_cores": len(os.sched_getaffinity(0))})
    print(f"gpu_check: {machine}", flush=True)
    report = {"machine": machine, "targets": {"ratio": TARGETS, "min_cosine": MIN_COSINE}}
    sampler = GpuSampler(device.index or 0) if device.type == "cuda" else None
    try:
        clips = build_unique(workdir / "unique", sizes["unique_s"], args.seed, args.dry_run)
        print(f"synthesised {len(clips)} clips, {sum(s for _, s in clips) / 60:.1f} min, in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        models = []
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            result = check_model(name, args, sizes, clips, workdir, device, sampler)
            models.append(result)
            print(f"[{name}] {result['corpus']['audio_h']:.2f} h, {result['embedded']} embedded / {result['failed']} failed, "
                  f"{result['dtype']}: pipeline {show(result['pipeline_x_real_time'])}x real time (steady), "
                  f"ceiling {show(result['ceiling_x_real_time'])}x, ratio {show(result.get('ratio'), '{:.2f}')} "
                  f"(target >= {result['target']}), GPU {show(result['gpu_utilisation_pct'])}%, "
                  f"peak {show(result['peak_gpu_memory_mib'], '{:.0f}')} MiB, min cos to fp32 "
                  f"{result['min_cosine_to_fp32']:.5f}; {time.perf_counter() - started:.0f} s so far", flush=True)
        report["models"] = models
        report["two_ranks"] = check_two_ranks(args, sizes, clips, workdir, device)
        print(f"2 ranks on one device vs 1 rank: {report['two_ranks']}", flush=True)
        report["oom"] = check_oom(args, sizes, clips, workdir, device)
        print(f"forced out-of-memory: {report['oom']}", flush=True)
    finally:
        if sampler is not None:
            sampler.stop()
        if tmp is not None:
            tmp.cleanup()
    report["total_s"] = round(time.perf_counter() - started, 1)

    failures = []
    print()
    print(f"{'model':<11} {'pipeline x':>10} {'ceiling x':>10} {'ratio':>6} {'target':>6} {'GPU %':>6} "
          f"{'peak MiB':>8} {'min cos':>8}")
    for r in report["models"]:
        print(f"{r['model']:<11} {show(r['pipeline_x_real_time']):>10} {show(r['ceiling_x_real_time']):>10} "
              f"{show(r.get('ratio'), '{:.2f}'):>6} {r['target']:>6} {show(r['gpu_utilisation_pct']):>6} "
              f"{show(r['peak_gpu_memory_mib'], '{:.0f}'):>8} {r['min_cosine_to_fp32']:>8.5f}")
        if r["failed"] or r["embedded"] == 0:
            failures.append(f"{r['model']}: {r['failed']} files failed")
        if r["min_cosine_to_fp32"] < MIN_COSINE or r["cosine_files"] == 0:
            failures.append(f"{r['model']}: min cosine {r['min_cosine_to_fp32']} < {MIN_COSINE}")
        if not args.dry_run and (r.get("ratio") or 0) < r["target"]:  # speed means nothing on the CPU rehearsal
            failures.append(f"{r['model']}: ratio {r.get('ratio')} < {r['target']}")
    if not report["two_ranks"]["passed"]:
        failures.append("2 ranks differ from 1 rank")
    if not report["oom"]["passed"]:
        failures.append("the forced out-of-memory did not split once with every file embedded")
    report["failures"] = failures
    print(f"\n{'all checks passed' if not failures else 'FAILED: ' + '; '.join(failures)} "
          f"({report['total_s']:.0f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
