#!/usr/bin/env python3
"""Throughput benchmark: reference-style loop vs. our pipeline vs. the model-only ceiling.

One run builds (or reuses) a corpus with a realistic mix of durations, rates and channel counts,
then, for each model (CAM++ with the real default weights, full-size ERes2NetV2 with random
weights), measures on the same files:

  (a) reference  -- what 3D-Speaker's extract.py does: one file at a time, decode (+resample),
                    Kaldi fbank on the CPU, model at batch size 1 in fp32 (model on --device),
                    our models unfused, torch/oneDNN left at their defaults; timed as a whole
                    process like (b) and like issue 14's table (start-up, model load, the loop,
                    results saved, exit; less the bench's own thread-count probe), and the loop alone;
  (b) pipeline   -- ``extract_speaker_embeddings.py`` as a whole process (start-up, scan, model
                    load, decode workers, batched fbank + model, results written), wall clock;
  (c) ceiling    -- the model alone, same dtype and memory format as (b): on CPU on fixed 6 s
                    inputs at its best batch size; on CUDA on the very batch shapes (b) makes of
                    this corpus (same plan, padding and grid; see same_shapes_ceiling);
  (d) peers      -- CPU: the model alone on one 6 s input, batch 1, all cores, interleaved: the fp32
                    reference code, ONNX Runtime fp32 and OpenVINO fp32 / bf16 on an export of the same
                    weights (whatever of them is installed: pip install -c constraints.txt onnxruntime
                    onnx ".[openvino]"), and ours as ``auto`` chose (``--skip_peers`` leaves it out);
  (e) sherpa-onnx -- CPU: sherpa-onnx's SpeakerEmbeddingExtractor (C++: its own fbank, ONNX Runtime,
                    2 threads) on an export of the same weights in its format (bench/sherpa_peer.py),
                    one file at a time over the same files, loop time only: decode (soundfile, first
                    channel) + soxr resample + its fbank and model; model load and export excluded.
                    Skipped with a note when it is not installed (pip install -c constraints.txt -r
                    bench/requirements-sherpa.txt); its fbank differs from the reference's, so it is a
                    speed peer only (its cosines to (a) are reported, not required).

Before (b), ``auto``'s first-run work (OpenVINO export, calibration) is done once and timed apart, so
(b) runs with it cached. The CPU's key flags, AMX or not, and what ``auto`` chose are printed.

(b) also reports its steady state (from the rank's metadata ``timing``: audio embedded after the
first batch over the time since, so start-up is excluded); on a GPU that, not the whole process,
is what compares with (c). For a GPU's steady state use hours of audio: bench/gpu_check.sh.

Speeds are x real time (audio seconds per wall second). Also reported: min cosine of (b) to (a)
over files, and the peak resident memory of each phase (max RSS of the process and its decode
workers). Each phase runs in its own process so memory and thread settings do not leak.

    python bench/bench_throughput.py                       # CPU, ~5-10 min on 2 cores
    python bench/bench_throughput.py --quick               # ~1-2 min smoke run
    python bench/bench_throughput.py --device cuda:1       # one GPU, (a), (b) and (c) all on GPU 1
    python bench/bench_throughput.py --extract_args "--batch_frames 6000"   # try a setting
    python bench/bench_throughput.py --phases de           # only the peers: (d) and (e)

Results: a table on stdout and JSON (``--json``, default bench/results/throughput_<device>.json).
"""
import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))  # sherpa_peer, also when this file is imported, not run

MODELS = {
    # name: (config, minutes of audio in the full corpus, minutes in --quick)
    "campplus": ("conf/campplus.yaml", 20.0, 3.0),
    "eres2netv2": ("conf/eres2netv2.yaml", 8.0, 1.5),
}


# --------------------------------------------------------------------------------- corpus
def speechlike(seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Voiced-speech-like signal: a gliding F0 with ~12 harmonics shaped by two formants,
    syllable-rate (3-6 Hz) amplitude bursts with pauses, and background noise."""
    n = max(1, int(seconds * rate))
    t = np.arange(n) / rate
    f0_base = rng.uniform(90, 240)
    f0 = f0_base * (1 + 0.12 * np.sin(2 * np.pi * rng.uniform(0.2, 0.7) * t + rng.uniform(0, 6))
                    + 0.05 * np.sin(2 * np.pi * rng.uniform(1.5, 3) * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    formants = rng.uniform([400, 1100], [900, 2400])
    wave = np.zeros(n)
    for k in range(1, 13):
        fk = f0_base * k
        if fk >= rate / 2 * 0.9:
            break
        gain = sum(np.exp(-0.5 * ((fk - f) / 250.0) ** 2) for f in formants) + 0.3 / k
        wave += gain * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    syll = rng.uniform(3, 6)
    envelope = np.clip(np.sin(2 * np.pi * syll * t + rng.uniform(0, 6)), 0, None) ** 0.7
    pauses = np.repeat(rng.random(int(seconds) + 2) < 0.8, rate)[:n]  # ~20% of seconds silent-ish
    wave = wave * envelope * (0.15 + 0.85 * pauses)
    wave = 0.25 * wave / (np.max(np.abs(wave)) + 1e-9)
    wave += rng.uniform(0.002, 0.02) * rng.standard_normal(n)
    return np.clip(wave, -1, 1).astype(np.float32)


def draw_duration(rng: np.random.Generator) -> float:
    u = rng.random()
    if u < 0.05:
        return float(rng.uniform(0.6, 2.0))           # short
    if u < 0.90:
        return float(np.clip(rng.lognormal(np.log(6.0), 0.55), 2.0, 20.0))  # the bulk: 2-20 s
    return float(rng.uniform(20.0, 60.0))             # some longer


def build_corpus(root: Path, minutes: float, seed: int, real_dir: Path = None) -> dict:
    """data_root/<dataset>/<speaker>/<utt>: 75% 16 kHz, 15% 8 kHz, 10% 44.1 kHz; 10% stereo;
    10% FLAC; plus the real demo speech segments when given. Deterministic for a seed."""
    import soundfile as sf
    done = root / "corpus.json"
    if done.is_file():
        return json.loads(done.read_text())
    rng = np.random.default_rng(seed)
    total, count, rates, stereo = 0.0, 0, {}, 0
    speakers = [f"spk{i:03d}" for i in range(24)]
    while total < minutes * 60:
        seconds = draw_duration(rng)
        rate = int(rng.choice([16000, 8000, 44100], p=[0.75, 0.15, 0.10]))
        channels = 2 if rng.random() < 0.10 else 1
        wave = speechlike(seconds, rate, rng)
        if channels == 2:
            wave = np.stack([wave, 0.6 * wave + 0.01 * rng.standard_normal(len(wave)).astype(np.float32)], 1)
        ext = "flac" if rng.random() < 0.10 else "wav"
        dataset = "synthA" if count % 3 else "synthB"
        path = root / dataset / speakers[count % len(speakers)] / f"utt{count:05d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), wave, rate, subtype="PCM_16")
        total += len(wave) / rate
        count += 1
        rates[rate] = rates.get(rate, 0) + 1
        stereo += channels == 2
    real = 0
    if real_dir is not None and real_dir.is_dir():
        for src in sorted(real_dir.rglob("*.wav")):
            rel = src.relative_to(real_dir)
            dst = root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
            total += sf.info(str(dst)).duration
            real += 1
    info = {"files": count + real, "synthetic_files": count, "real_speech_files": real,
            "audio_s": round(total, 2), "rates": {str(k): v for k, v in sorted(rates.items())},
            "stereo_files": int(stereo), "seed": seed}
    done.write_text(json.dumps(info, indent=1))
    return info


def list_corpus(root: Path):
    from speakerlab.data import scan_tree
    return scan_tree(root).utterances


# --------------------------------------------------------------------------------- models
def random_eres2netv2(path: Path, config_file: str, seed: int = 0) -> Path:
    """Full-size ERes2NetV2 with PyTorch's default random initialisation (seeded), saved as a
    plain state_dict. No trained ERes2NetV2 weights can be fetched here; speed does not depend on
    the weights. Note on precision: default-init embeddings are fairly alike between files (see
    ``between_files_mean_cosine`` in the results), so their bf16-vs-fp32 cosine is an easy test.
    A random net with BatchNorm calibrated on speech features is the opposite extreme: chaotic
    (2**-9 relative input noise alone moves its fp32 embedding to cosine ~0.98), so neither says
    how a trained ERes2NetV2 takes bf16; the real CAM++ checkpoint does (cosine 0.9997)."""
    if path.is_file():
        return path
    import torch
    from speakerlab.config import load_config
    from speakerlab.models import build_model
    torch.manual_seed(seed)
    model = build_model(load_config(config_file)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def model_files(name: str, workdir: Path, corpus: Path):
    config = str(ROOT / MODELS[name][0])
    if name == "campplus":
        from speakerlab import zoo
        return zoo.default_model_path(), config
    return random_eres2netv2(workdir / "eres2netv2_random_init.ckpt", config), config


# ------------------------------------------------------------------------------ processes
def run_measured(cmd, env=None, cwd=ROOT):
    """Run a command; return (wall s, peak RSS in MiB of it and its children, stdout, stderr, extra)
    where extra has the CPU seconds it used (user + sys, children included) and the load average
    before it started (other work on the machine skews wall-clock numbers: compare CPU seconds)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        load = os.getloadavg()[0]
        started = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=full_env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{stderr[-3000:]}")
    extra = {"cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "load_before": round(load, 2)}
    return wall, usage.ru_maxrss / 1024.0, stdout, stderr, extra


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def phase_reference(args) -> dict:
    """(a): the reference extractor's loop, one file at a time, fp32, batch 1."""
    import torch
    from speakerlab.audio import AudioError, load_audio
    from speakerlab.config import load_config
    from speakerlab.features import Fbank, FbankConfig
    from speakerlab.models import load_model
    device = torch.device(args.device)
    config = load_config(args.config_file)
    model = load_model(config, args.model_path).to(device).eval()
    # the whole utterance in one piece, as the reference's torchaudio.compliance.kaldi.fbank computes
    # it (our pipeline's cache-sized chunks are one of its own speed-ups, not the reference's)
    fbank = Fbank(FbankConfig(sample_rate=config.sample_rate, num_mel_bins=config.fbank_dim),
                  max_frames_per_chunk=1 << 30)
    utterances = list_corpus(Path(args.data_root))

    def loop():
        keys, embs, audio_s = [], [], 0.0
        with torch.inference_mode():
            for utt in utterances:
                try:
                    wave = load_audio(utt.path, config.sample_rate)
                except AudioError:
                    continue
                feats, frames = fbank(torch.from_numpy(wave)[None])       # CPU Kaldi fbank
                if int(frames[0]) < getattr(model, "min_frames", 2):
                    continue
                emb = model(feats.to(device))                              # batch 1, fp32
                embs.append(emb[0].float().cpu().numpy())
                keys.append(utt.key)
                audio_s += len(wave) / config.sample_rate
        sync(device)
        return keys, embs, audio_s

    # The reference's thread count: torch's default (all cores, what extract.py gets) and 1, each
    # timed over the whole loop, the faster kept (a probe on the model alone picked 1 thread when the
    # whole-utterance fbank runs faster on 2: loop 30 s vs 21.5 s). On a busy machine the all-core
    # setting can be many times slower (threads wait on preempted peers at every op), and the
    # comparison should not flatter (b) with a handicapped reference.
    loops = {}
    for count in ([args.reference_threads] if args.reference_threads else
                  sorted({torch.get_num_threads(), 1}, reverse=True)):
        torch.set_num_threads(count)
        started = time.perf_counter()
        result = loop()
        loops[count] = (time.perf_counter() - started, result)
    chosen = min(loops, key=lambda c: loops[c][0])
    elapsed, (keys, embs, audio_s) = loops[chosen]
    probe_s = sum(t for c, (t, _) in loops.items() if c != chosen)  # the bench's own: left out of (a)'s whole process
    np.savez(args.out, keys=np.array(keys), embeddings=np.stack(embs))
    return {"seconds": elapsed, "audio_s": audio_s, "files": len(keys), "threads": chosen, "probe_s": probe_s,
            "probe_s_by_threads": {str(c): round(t, 3) for c, (t, _) in loops.items()}}


def same_shapes_ceiling(embedder, num_samples, batch_frames: int, batch_size=None) -> dict:
    """Model-only x real time on exactly the batches the pipeline makes of these lengths (same plan:
    frame budget, count cap, length grid, longest first), with features of the same padded shapes
    and the same valid lengths (random values: the cost does not depend on them), after one warm-up
    batch of each distinct shape (cuDNN's set-up per shape is start-up, as in the pipeline's steady
    rate). ``num_samples`` at the model's rate."""
    import torch
    from speakerlab.batching import plan_batches
    device = embedder.device
    cfg = embedder.fbank.config
    cap = batch_size or max(1, len(num_samples))
    plan = plan_batches(num_samples, batch_frames, cap, frame_shift=cfg.frame_shift, grid=embedder.grid,
                        grid_steps=embedder.grid_steps)[::-1]
    all_frames = embedder.fbank.frame_lengths(torch.tensor(list(num_samples), dtype=torch.long)).tolist()
    batches, audio_s = [], 0.0
    for batch in plan:
        rows = [(all_frames[i], i) for i in batch if embedder.min_frames <= all_frames[i] <= embedder.max_chunk_frames]
        if rows:
            batches.append(torch.tensor([f for f, _ in rows]))
            audio_s += sum(num_samples[i] for _, i in rows) / cfg.sample_rate
    most = max(len(f) * int(f.max()) for f in batches)
    buffer = torch.randn(most * cfg.num_mel_bins, device=device)

    def run(frames):
        feats = buffer[:len(frames) * int(frames.max()) * cfg.num_mel_bins].view(len(frames), -1, cfg.num_mel_bins)
        return embedder._forward(feats, frames)

    from speakerlab.devices import exact_fp32
    with torch.inference_mode(), exact_fp32(embedder.exact_fp32):
        seen = {}
        for frames in batches:
            seen.setdefault((len(frames), int(frames.max())), frames)
        warm = time.perf_counter()
        for frames in seen.values():
            run(frames)
        sync(device)
        started = time.perf_counter()
        for frames in batches:
            run(frames)
        sync(device)
        elapsed = time.perf_counter() - started
    return {"x_real_time": audio_s / elapsed, "audio_s": round(audio_s, 1), "model_s": round(elapsed, 3),
            "batches": len(batches), "shapes": len(seen), "warm_up_s": round(started - warm, 2),
            "batch_frames": batch_frames, "grid_steps": embedder.grid_steps if embedder.grid else None}


def phase_ceiling(args) -> dict:
    """(c): model only, the pipeline's dtype / memory format. CPU: fixed 6 s inputs at the best batch
    size, in the pipeline's streams. CUDA: the pipeline's own batch shapes (same_shapes_ceiling)."""
    import torch
    from concurrent.futures import ThreadPoolExecutor
    from speakerlab.config import load_config
    from speakerlab.embedder import Embedder, default_batch_frames
    from speakerlab.extract import cpu_plan
    from speakerlab.models import load_model
    device = torch.device(args.device)
    _, threads, streams = cpu_plan(-1, 1, device)
    torch.set_num_threads(threads)
    config = load_config(args.config_file)
    embedder = Embedder(load_model(config, args.model_path), config, device, dtype=args.dtype,
                        backend=args.backend, streams=streams)  # as the pipeline builds it
    dtype = embedder.dtype
    if device.type == "cuda":
        sr = config.sample_rate
        from speakerlab.data import read_headers
        utterances = list_corpus(Path(args.data_root))
        read_headers(utterances, 16)
        lengths = [int(u.num_samples * sr / u.sample_rate) for u in utterances if u.sample_rate]
        result = same_shapes_ceiling(embedder, lengths, default_batch_frames(device, embedder.model))
        result.update({"dtype": dtype, "channels_last": embedder.channels_last, "best_batch": "pipeline's",
                       "x_real_time_by_batch": {}})
        return result
    frames = 598  # 6 s of audio at 10 ms shift, 25 ms window
    budget = args.ceiling_seconds

    def stream(batch):
        feats = torch.randn(batch, frames, config.fbank_dim, device=device)
        lengths = torch.full((batch,), frames, device=device)
        embedder._forward(feats, lengths)  # warm-up (and cudnn/oneDNN kernel selection)
        sync(device)
        runs, started = 0, time.perf_counter()
        while True:
            embedder._forward(feats, lengths)
            runs += 1
            sync(device)
            elapsed = time.perf_counter() - started
            if elapsed >= budget and runs >= 2:
                return runs * batch * 6.0 / elapsed

    results = {}
    with ThreadPoolExecutor(streams, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        for batch in [int(b) for b in args.batches.split(",")]:
            results[batch] = sum(pool.map(stream, [batch] * streams))
    best = max(results, key=results.get)
    return {"dtype": dtype, "backend": embedder.backend, "channels_last": embedder.channels_last,
            "streams": streams, "threads": threads,
            "x_real_time_by_batch": {str(k): round(v, 1) for k, v in results.items()},
            "best_batch": best, "x_real_time": results[best]}


def phase_prepare(args) -> dict:
    """Once per machine, model and versions, before (b): what ``auto`` does on a first run (export the
    model for OpenVINO, measure the candidates), so (b) times a run with the model cached, as a
    corpus of thousands of files sees it; its cost is reported on its own."""
    import torch
    from speakerlab.config import load_config
    from speakerlab.embedder import Embedder
    from speakerlab.extract import cpu_plan
    from speakerlab.models import load_model
    _, threads, streams = cpu_plan(-1, 1, torch.device(args.device))
    torch.set_num_threads(threads)
    config = load_config(args.config_file)
    started = time.perf_counter()
    embedder = Embedder(load_model(config, args.model_path), config, torch.device(args.device), dtype=args.dtype,
                        backend=args.backend, streams=streams)
    return {"seconds": round(time.perf_counter() - started, 2), "engine": embedder.choice}


def phase_peers(args) -> dict:
    """(d): model only, one 6 s input at batch 1 on all cores (the issue-14 setting), fp32 reference code
    vs what a user gets by exporting the same weights: ONNX Runtime fp32, OpenVINO fp32 / bf16 (whole
    model, traced from our modules), and ours as ``auto`` chose (the same Embedder the pipeline builds).
    Candidates run interleaved, round after round, so load on the machine hits all alike."""
    import copy
    import warnings
    import torch
    from speakerlab import backends
    from speakerlab.config import load_config
    from speakerlab.embedder import Embedder
    from speakerlab.models import load_model
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    config = load_config(args.config_file)
    model = load_model(config, args.model_path).eval()
    frames = 598
    feats = torch.randn(1, frames, config.fbank_dim, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([frames])
    ours = Embedder(copy.deepcopy(model), config, torch.device("cpu"), dtype=args.dtype, backend=args.backend,
                    streams=1)
    runs = {"torch reference fp32": lambda: model(feats, lengths),
            f"ours ({ours.backend} {ours.dtype})": lambda: ours._forward(feats, lengths)}
    notes = {}
    fresh = backends._fresh_copy(model)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import onnxruntime as ort
            onnx_path = Path(tmp) / "model.onnx"
            torch.onnx.export(fresh, (torch.randn(2, 233, config.fbank_dim), torch.tensor([233, 150])), onnx_path,
                              dynamo=False, input_names=["feats", "lengths"], output_names=["embedding"],
                              dynamic_axes={"feats": {0: "batch", 1: "frames"}, "lengths": {0: "batch"}},
                              opset_version=17)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            inputs = {"feats": feats.numpy(), "lengths": lengths.numpy()}
            runs[f"onnxruntime {ort.__version__} fp32"] = lambda: session.run(None, inputs)
        except ImportError as exc:
            notes["onnxruntime"] = f"not installed ({exc})"
        try:
            import openvino as ov
            example = (torch.randn(2, 233, config.fbank_dim), torch.tensor([233, 150]))
            traced = torch.jit.trace(fresh, example, check_trace=False)
            converted = backends.convert_model(traced, example_input=example, input=[
                (ov.PartialShape([-1, -1, config.fbank_dim]), ov.Type.f32), (ov.PartialShape([-1]), ov.Type.i64)])
            for precision in ["f32"] + (["bf16"] if backends.openvino_bf16() else []):
                compiled = backends.openvino_core().compile_model(converted, "CPU", {  # one Core: backends.py
                    "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
                    "PERFORMANCE_HINT": "LATENCY"})
                request = compiled.create_infer_request()
                runs[f"openvino {ov.__version__.split('-')[0]} {precision}"] = (
                    lambda r=request: r.infer([feats.numpy(), lengths.numpy()]))
        except ImportError as exc:
            notes["openvino"] = f"not installed ({exc})"
        with torch.inference_mode():
            for run in runs.values():  # warm-up
                run()
                run()
            best = {name: float("inf") for name in runs}
            started = time.perf_counter()
            while time.perf_counter() - started < args.ceiling_seconds * len(runs) or min(best.values()) == float("inf"):
                for name, run in runs.items():
                    t = time.perf_counter()
                    run()
                    best[name] = min(best[name], time.perf_counter() - t)
    return {"threads": threads, "input_s": 6.0, "batch": 1, "engine": ours.choice,
            "x_real_time": {name: round(6.0 / t, 1) for name, t in best.items()}, "notes": notes}


def phase_sherpa(args) -> dict:
    """(e): sherpa-onnx's SpeakerEmbeddingExtractor (C++: its own fbank, ONNX Runtime, --sherpa_threads
    threads) on our weights exported in its format (bench/sherpa_peer.py), one file at a time over the
    same corpus; loop time only (sherpa_peer.WHAT_IS_TIMED). Embeddings go to --_out for the cosines."""
    import sherpa_peer
    from speakerlab.config import load_config
    config = load_config(args.config_file)
    language = "Chinese, English" if Path(args.model_path).name == "campplus_cn_en_common.pt" else "unknown"
    onnx_path, export_s, cached = sherpa_peer.cached_export(args.model_path, config, language)
    extractor = sherpa_peer.make_extractor(onnx_path, args.sherpa_threads)
    if extractor.dim != config.embedding_size:
        raise RuntimeError(f"{onnx_path}: sherpa-onnx reports dim {extractor.dim}, the model has "
                           f"{config.embedding_size}")
    utterances = list_corpus(Path(args.data_root))
    sherpa_peer.embed(extractor, sherpa_peer.decode(utterances[0].path, config.sample_rate), config.sample_rate)
    keys, embs, audio_s, seconds = sherpa_peer.run_loop(extractor, utterances, config.sample_rate)
    np.savez(args.out, keys=np.array(keys), embeddings=np.stack(embs))
    return {"version": sherpa_peer.sherpa_version(), "threads": args.sherpa_threads, "loop_s": seconds,
            "audio_s": audio_s, "files": len(keys), "onnx": str(onnx_path), "export_s": round(export_s, 2),
            "export_cached": cached, "timed": sherpa_peer.WHAT_IS_TIMED}


# (a) runs as the reference does, with oneDNN's own settings: its kernel cache of 1024 entries, not
# the 16384 that speakerlab sets for the pipeline (a run with that gave CAM++ 73.9x, vs 68.6-71.5x).
REFERENCE_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}


def run_phase(name: str, args, model_path, config_file, data_root, out) -> tuple:
    cmd = [sys.executable, __file__, "--_phase", name, "--_model_path", model_path,
           "--_config_file", config_file, "--_data_root", data_root, "--_out", out,
           "--device", args.device, "--dtype", args.dtype, "--batches", args.batches,
           "--ceiling_seconds", str(args.ceiling_seconds), "--reference_threads", str(args.reference_threads),
           "--backend", args.backend, "--sherpa_threads", str(args.sherpa_threads)]
    env = REFERENCE_ENV if name == "reference" else None
    wall, rss, stdout, _, extra = run_measured(cmd, env=env)
    if env:
        extra["env"] = dict(env)
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(extra)
    return result, rss, wall


def pipeline_cmd(args, model_path, config_file, data_root, output_dir, extra_args=""):
    cmd = [sys.executable, ROOT / "extract_speaker_embeddings.py", "--data_root", data_root,
           "--output_dir", output_dir, "--model_path", model_path, "--config_file", config_file,
           "--no_progress", "--overwrite"]
    if args.device != "cpu":  # the pipeline's one rank on that GPU
        cmd += ["--use_gpu", "--gpu", str(torch_index(args.device))]
    if args.dtype != "auto":
        cmd += ["--dtype", args.dtype]
    if args.backend != "auto":
        cmd += ["--backend", args.backend]
    return cmd + shlex.split(extra_args)


def torch_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def cosines(ref_file: Path, rank_file: Path):
    with np.load(ref_file) as ref, np.load(rank_file) as ours:
        ref_map = dict(zip(ref["keys"].tolist(), ref["embeddings"]))
        our_map = dict(zip(ours["keys"].tolist(), ours["embeddings"]))
    common = sorted(set(ref_map) & set(our_map))
    a = np.stack([ref_map[k] for k in common]).astype(np.float64)
    b = np.stack([our_map[k] for k in common]).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    # spread between files: a healthy model gives clearly different embeddings to different files
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    cross = an @ an.T
    off = cross[~np.eye(len(an), dtype=bool)]
    return {"files_compared": len(common), "missing_in_pipeline": len(set(ref_map) - set(our_map)),
            "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "worst_file": common[int(cos.argmin())], "between_files_mean_cosine": float(off.mean())}


PHASES = {"a": "reference loop", "b": "pipeline", "c": "model-only ceiling", "d": "model-only peers",
          "e": "sherpa-onnx"}


def chosen_phases(args) -> str:
    """The phases to run: --phases (letters a-e), less those a --skip_* flag leaves out."""
    phases = "".join(c for c in args.phases if c in PHASES)
    for flag, letter in (("skip_ceiling", "c"), ("skip_peers", "d"), ("skip_sherpa", "e")):
        if getattr(args, flag):
            phases = phases.replace(letter, "")
    return phases


def bench_reference(name, args, model_path, config_file, corpus, ref_out, result):
    ref, ref_rss, ref_wall = run_phase("reference", args, model_path, config_file, corpus, ref_out)
    # Whole process, as issue 14 measured its reference loop and as (b) is measured: start-up (torch,
    # model load), the loop, the results saved, exit -- less the bench's own thread-count probe.
    whole = ref_wall - ref["probe_s"]
    result["a_reference"] = {"x_real_time": ref["audio_s"] / whole, "whole_process_s": whole,
                             "loop_x_real_time": ref["audio_s"] / ref["seconds"], "loop_s": ref["seconds"],
                             "process_wall_s": ref_wall, "probe_s": ref["probe_s"], "peak_rss_mib": ref_rss,
                             "files": ref["files"], "process_cpu_s": ref["cpu_s"], "load_before": ref["load_before"],
                             "threads": ref["threads"], "probe_s_by_threads": ref["probe_s_by_threads"]}
    print(f"[{name}] (a) reference loop: {result['a_reference']['x_real_time']:.1f}x real time whole process "
          f"({whole:.1f} s; the loop alone {result['a_reference']['loop_x_real_time']:.1f}x, {ref['seconds']:.1f} s; "
          f"{ref['threads']} thread(s))", flush=True)


def bench_pipeline(name, args, model_path, config_file, corpus, workdir, ref_out, result):
    """auto's first-run preparation, then (b) (and its --baseline_args variant), interleaved."""
    info = result["corpus"]
    prep, _, _ = run_phase("prepare", args, model_path, config_file, corpus, workdir / "unused")
    result["first_run_preparation"] = prep
    print(f"[{name}] auto's first-run preparation (export, calibration; cached after): {prep['seconds']:.1f} s",
          flush=True)
    variants = [("b_pipeline", args.extract_args)]
    if args.baseline_args is not None:
        variants.append(("b_baseline", args.baseline_args))
    runs = {key: [] for key, _ in variants}
    for _ in range(args.repeat):  # variants interleaved, so a burst of other load hits both alike
        for key, extra_args in variants:
            out_dir = workdir / f"pipeline_{name}_{key}"
            cmd = pipeline_cmd(args, model_path, config_file, corpus, out_dir, extra_args)
            wall, rss, _, stderr, extra = run_measured(cmd)
            runs[key].append({"wall": wall, "rss": rss, "stderr": stderr, "cmd": cmd, **extra})
    for key, extra_args in variants:
        out_dir = workdir / f"pipeline_{name}_{key}"
        best = min(runs[key], key=lambda r: r["wall"])
        from speakerlab.rundir import RunDir
        meta = RunDir(out_dir).read_metadata(0)
        entry = {"x_real_time": info["audio_s"] / best["wall"], "process_wall_s": best["wall"],
                 "all_runs_wall_s": [round(r["wall"], 2) for r in runs[key]],
                 "peak_rss_mib": max(r["rss"] for r in runs[key]), "process_cpu_s": best["cpu_s"],
                 "load_before": best["load_before"], "extract_args": extra_args,
                 "embedded": meta["counts"]["embedded"], "failed": meta["counts"]["failed"],
                 "dtype": meta["dtype"], "batch_policy": meta.get("batch_policy"), "engine": meta.get("engine"),
                 "command": " ".join(shlex.quote(str(c)) for c in best["cmd"]),
                 "log": [l for l in best["stderr"].splitlines() if "INFO" in l or "WARN" in l][-6:]}
        if ref_out is not None:
            entry.update(cosines(ref_out, RunDir(out_dir).rank_embeddings_path(0)))
        timing = meta.get("timing") or {}
        entry["steady_x_real_time"] = timing.get("steady_x_real_time")  # start-up and first batch excluded
        entry["timing"] = timing
        result[key] = entry
        steady = entry["steady_x_real_time"]
        engine = entry["engine"] or {}
        print(f"[{name}] ({'b' if key == 'b_pipeline' else 'b baseline'}) pipeline {extra_args!r}: "
              f"{entry['x_real_time']:.1f}x real time ({best['wall']:.1f} s whole process"
              + (f"; steady state {steady:.1f}x" if steady else "") + "), "
              + (f"min cosine to (a) {entry['min_cosine']:.5f}; " if "min_cosine" in entry else "")
              + f"engine {engine.get('backend')}/{engine.get('dtype')} "
              f"({engine.get('why', '')}; probe ms {engine.get('probe_ms')})", flush=True)


def bench_sherpa(name, args, model_path, config_file, corpus, workdir, ref_out, result):
    """(e): sherpa-onnx's extractor on an export of the same weights, same files, loop time only."""
    from sherpa_peer import INSTALL_HINT, sherpa_version
    skip = None
    if args.device != "cpu":
        skip = "CPU only (its pip wheel runs ONNX Runtime on the CPU)"
    elif sherpa_version() is None:
        skip = f"sherpa_onnx not installed ({INSTALL_HINT})"
    if skip:
        result["e_sherpa_onnx"] = {"skipped": skip}
        print(f"[{name}] (e) sherpa-onnx skipped: {skip}", flush=True)
        return
    out = workdir / f"sherpa_{name}.npz"
    sherpa, rss, wall = run_phase("sherpa", args, model_path, config_file, corpus, out)
    entry = {"x_real_time": sherpa["audio_s"] / sherpa["loop_s"], "process_wall_s": wall, "peak_rss_mib": rss,
             **sherpa}
    if ref_out is not None:  # near, not equal: its fbank differs from the reference's
        entry["cosine_to_a"] = cosines(ref_out, out)
    result["e_sherpa_onnx"] = entry
    print(f"[{name}] (e) sherpa-onnx {sherpa['version']} ({sherpa['threads']} threads, its own fbank; loop time "
          f"only): {entry['x_real_time']:.1f}x real time ({sherpa['loop_s']:.1f} s, {sherpa['files']} files)"
          + (f"; min cosine to (a) {entry['cosine_to_a']['min_cosine']:.3f}" if ref_out is not None else "")
          + (f"; export {sherpa['export_s']:.1f} s" if not sherpa["export_cached"] else "; export cached"),
          flush=True)


def ratios(result) -> dict:
    """Speed ratios between the phases that ran."""
    speed = {key: result[key]["x_real_time"] for key in ("a_reference", "b_pipeline", "b_baseline", "c_ceiling",
                                                         "e_sherpa_onnx")
             if key in result and "x_real_time" in result[key]}
    out = {}
    for ours, label in (("b_pipeline", "b"), ("b_baseline", "baseline")):
        if ours not in speed:
            continue
        if "a_reference" in speed:  # whole process over whole process; and over (a)'s loop alone (stricter)
            out[f"{label}_over_a"] = speed[ours] / speed["a_reference"]
            if result["a_reference"].get("loop_x_real_time"):
                out[f"{label}_over_a_loop"] = speed[ours] / result["a_reference"]["loop_x_real_time"]
        if "e_sherpa_onnx" in speed:  # whole process against sherpa-onnx's loop time
            out[f"{label}_over_sherpa"] = speed[ours] / speed["e_sherpa_onnx"]
    if "b_pipeline" in speed and "c_ceiling" in speed:
        out["b_over_c"] = speed["b_pipeline"] / speed["c_ceiling"]
        steady = result["b_pipeline"].get("steady_x_real_time")
        if steady:  # the GPU's measure: whole-process start-up is seconds against little model time
            out["b_steady_over_c"] = steady / speed["c_ceiling"]
    if "a_reference" in speed and "e_sherpa_onnx" in speed:
        out["sherpa_over_a"] = speed["e_sherpa_onnx"] / speed["a_reference"]
    if "d_peers" in result:  # ours over each peer, model only
        speeds = result["d_peers"]["x_real_time"]
        mine = next(v for k, v in speeds.items() if k.startswith("ours"))
        out["model_only_ours_over"] = {k: round(mine / v, 2) for k, v in speeds.items() if not k.startswith("ours")}
    return out


def bench_model(name: str, args, workdir: Path) -> dict:
    minutes = MODELS[name][2] if args.quick else MODELS[name][1]
    if args.minutes is not None:
        minutes = args.minutes
    corpus = Path(args.corpus_dir or workdir) / f"corpus_{name}_{minutes:g}min"
    real = Path(os.environ.get("SPEAKERLAB_FIXTURES", ROOT.parent / "shared" / "fixtures")) / "campplus_sample" / "data"
    t0 = time.perf_counter()
    info = build_corpus(corpus, minutes, seed=args.seed, real_dir=real if args.real_speech else None)
    print(f"[{name}] corpus {corpus}: {info['files']} files, {info['audio_s'] / 60:.1f} min "
          f"(built/reused in {time.perf_counter() - t0:.1f} s)", flush=True)
    model_path, config_file = model_files(name, workdir, corpus)
    result = {"model": name, "model_path": str(model_path), "config": config_file, "corpus": info}

    phases = chosen_phases(args)
    ref_out = workdir / f"reference_{name}.npz"
    if "a" in phases:
        bench_reference(name, args, model_path, config_file, corpus, ref_out, result)
    if "b" in phases:
        bench_pipeline(name, args, model_path, config_file, corpus, workdir, ref_out if "a" in phases else None,
                       result)
    if "c" in phases:
        ceil, ceil_rss, _ = run_phase("ceiling", args, model_path, config_file, corpus, workdir / "unused")
        ceil["peak_rss_mib"] = ceil_rss
        result["c_ceiling"] = ceil
        print(f"[{name}] (c) model-only ceiling: {ceil['x_real_time']:.1f}x real time "
              f"(batch {ceil['best_batch']}, {ceil['dtype']}; {ceil['x_real_time_by_batch']})", flush=True)
    if "d" in phases:
        peers, peers_rss, _ = run_phase("peers", args, model_path, config_file, corpus, workdir / "unused")
        peers["peak_rss_mib"] = peers_rss
        result["d_peers"] = peers
        print(f"[{name}] (d) model only, 6 s, batch 1, {peers['threads']} threads, x real time: "
              + ", ".join(f"{k} {v}" for k, v in peers["x_real_time"].items())
              + (f"; {peers['notes']}" if peers["notes"] else ""), flush=True)
    if "e" in phases:
        bench_sherpa(name, args, model_path, config_file, corpus, workdir, ref_out if "a" in phases else None,
                     result)
    result["ratios"] = ratios(result)
    return result


def machine_info(device: str) -> dict:
    import torch
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_cores": len(os.sched_getaffinity(0)), "device": device}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch_index(device))
    try:
        from speakerlab.embedder import cpu_has_fast_bf16
        info["cpu_native_bf16"] = cpu_has_fast_bf16()
    except Exception:
        pass
    from speakerlab.calibration import cpu_identity
    flags = cpu_identity()["flags"].split()
    info["cpu_flags"] = " ".join(flags)
    info["cpu_key_flags"] = [f for f in flags if f in KEY_FLAGS]
    info["amx"] = "amx_bf16" in flags
    from speakerlab.backends import openvino_version
    info["openvino"] = (openvino_version() or "").split("-")[0] or None
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    from sherpa_peer import sherpa_version
    info["sherpa_onnx"] = sherpa_version()
    return info


KEY_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
             "amx_int8", "avx_vnni", "avx_ne_convert")


def print_peers(results):
    for r in results:
        if "d_peers" in r:
            print(f"{r['model']}: model only (6 s, batch 1, {r['d_peers']['threads']} threads), x real time; "
                  f"ours over each:")
            ratios = r["ratios"].get("model_only_ours_over", {})
            for name, speed in r["d_peers"]["x_real_time"].items():
                print(f"  {name:<34} {speed:>8.1f}x" + (f"   ours / it = {ratios[name]:.2f}" if name in ratios else ""))
        sherpa = r.get("e_sherpa_onnx")
        if sherpa is None:
            continue
        if "skipped" in sherpa:
            print(f"{r['model']}: sherpa-onnx skipped: {sherpa['skipped']}")
            continue
        mine = "; ".join(f"{label} / it = {r['ratios'][key]:.2f}" for key, label in (
            ("b_over_sherpa", "ours (b, whole process)"), ("baseline_over_sherpa", "ours (b baseline)"))
            if key in r["ratios"])
        print(f"{r['model']}: sherpa-onnx {sherpa['version']}, {sherpa['threads']} threads, loop time only: "
              f"{sherpa['x_real_time']:.1f}x" + (f"; {mine}" if mine else ""))


def print_table(results):
    """One row per model; a phase that did not run shows nan."""
    nan = float("nan")

    def get(r, key, field):
        value = r.get(key, {}).get(field)
        return nan if value is None else value

    head = (f"{'model':<11} {'(a) ref x':>9} {'(b) ours x':>10} {'(c) ceil x':>10} {'(e) sherpa':>10} {'b/a':>6} {'b/aL':>6} "
            f"{'b/c':>6} {'bs/c':>6} {'base/a':>6} {'b/e':>6} "
            f"{'min cos':>8} {'dtype':>5} {'a MiB':>6} {'b MiB':>6} {'c MiB':>6} {'load':>5}")
    print(head)
    print("-" * len(head))
    for r in results:
        ratio = r["ratios"]
        print(f"{r['model']:<11} {get(r, 'a_reference', 'x_real_time'):>9.1f} {get(r, 'b_pipeline', 'x_real_time'):>10.1f} "
              f"{get(r, 'c_ceiling', 'x_real_time'):>10.1f} {get(r, 'e_sherpa_onnx', 'x_real_time'):>10.1f} "
              f"{ratio.get('b_over_a', nan):>6.2f} {ratio.get('b_over_a_loop', nan):>6.2f} {ratio.get('b_over_c', nan):>6.2f} "
              f"{ratio.get('b_steady_over_c', nan):>6.2f} {ratio.get('baseline_over_a', nan):>6.2f} "
              f"{ratio.get('b_over_sherpa', nan):>6.2f} {get(r, 'b_pipeline', 'min_cosine'):>8.5f} "
              f"{r.get('b_pipeline', {}).get('dtype', '-'):>5} {get(r, 'a_reference', 'peak_rss_mib'):>6.0f} "
              f"{get(r, 'b_pipeline', 'peak_rss_mib'):>6.0f} {get(r, 'c_ceiling', 'peak_rss_mib'):>6.0f} "
              f"{max(get(r, 'a_reference', 'load_before'), get(r, 'b_pipeline', 'load_before')):>5.1f}")
    print("x = audio seconds per wall second, whole process for (a) and (b) (start-up, model load, results saved; "
          "(a) less the bench's thread probe); b/aL = (b) over (a)'s loop alone (start-up left out of (a) only); MiB = peak RSS (process + decode workers); load = 1-min load "
          "average before (a)/(b) started (above ~0.5 per core, other work skews the numbers); base/a = "
          "(b) run with --baseline_args; bs/c = (b)'s steady state (start-up excluded) over (c), the GPU's measure; "
          "(e) sherpa-onnx is loop time only, b/e = our whole process over it")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (the pipeline then gets --use_gpu)")
    p.add_argument("--models", default="campplus,eres2netv2")
    p.add_argument("--quick", action="store_true", help="small corpora, short ceiling runs")
    p.add_argument("--minutes", type=float, default=None, help="corpus size for every model (minutes)")
    p.add_argument("--corpus_dir", default=None, help="where corpora are built / reused (default: workdir)")
    p.add_argument("--workdir", default=None, help="scratch dir (default: a temporary dir, removed)")
    p.add_argument("--no_real_speech", dest="real_speech", action="store_false",
                   help="leave out the real speech segments from the parity fixtures")
    p.add_argument("--dtype", default="auto", help="dtype for (b) and (c): auto (the pipeline's default) or fp32|bf16|fp16")
    p.add_argument("--extract_args", default="", help="extra arguments for the extraction command (b)")
    p.add_argument("--baseline_args", default=None,
                   help="also run (b) with these extraction arguments instead (e.g. an older setting), "
                        "interleaved with the default, and report both")
    p.add_argument("--repeat", type=int, default=1, help="run (b) this many times, keep the fastest")
    p.add_argument("--batches", default=None, help="batch sizes tried for (c), comma separated")
    p.add_argument("--ceiling_seconds", type=float, default=None, help="time per batch size in (c)")
    p.add_argument("--skip_ceiling", action="store_true")
    p.add_argument("--backend", default="auto", help="for (b), (c) and ours in (d): auto, torch or openvino")
    p.add_argument("--skip_peers", action="store_true", help="leave out (d), the model-only peers")
    p.add_argument("--skip_sherpa", action="store_true", help="leave out (e), sherpa-onnx")
    p.add_argument("--phases", default="abcde",
                   help="which phases to run, as letters: a reference loop, b pipeline (with auto's preparation), "
                        "c ceiling, d model-only peers, e sherpa-onnx (e.g. --phases de: the peers only; "
                        "ratios and cosines need the phases they compare)")
    p.add_argument("--sherpa_threads", type=int, default=2,
                   help="ONNX Runtime threads for (e), sherpa-onnx (default 2, as issue 14 measured it)")
    p.add_argument("--reference_threads", type=int, default=0,
                   help="threads for (a); 0 = the faster of torch's default and 1, each timed over the whole loop")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", default=None, help="write results here (default bench/results/throughput_<device>.json)")
    for hidden in ("--_phase", "--_model_path", "--_config_file", "--_data_root", "--_out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if args.batches is None:
        args.batches = "32,64,128,256" if gpu else "1,4,16"
    if args.ceiling_seconds is None:
        args.ceiling_seconds = 2.0 if args.quick else 5.0

    if args._phase:
        args.model_path, args.config_file = args._model_path, args._config_file
        args.data_root, args.out = args._data_root, args._out
        phases = {"reference": phase_reference, "ceiling": phase_ceiling, "peers": phase_peers,
                  "prepare": phase_prepare, "sherpa": phase_sherpa}
        result = phases[args._phase](args)
        print(json.dumps(result))
        return 0

    unknown = sorted(set(args.phases) - set(PHASES))
    if unknown or not chosen_phases(args):
        print(f"error: --phases {args.phases!r}: " + (f"unknown phase(s) {''.join(unknown)}; " if unknown else
              "no phase left to run; ") + "use letters from " + ", ".join(f"{k} {v}" for k, v in PHASES.items()),
              file=sys.stderr)
        return 2
    if args.sherpa_threads < 1:
        print(f"error: --sherpa_threads {args.sherpa_threads}: must be at least 1", file=sys.stderr)
        return 2
    os.environ.setdefault("SPEAKERLAB_FIXTURES", str(ROOT.parent / "shared" / "fixtures"))
    started = time.perf_counter()
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="speakerlab_bench_")
        workdir = Path(tmp.name)
    results = []
    try:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if name not in MODELS:
                print(f"error: unknown model {name}; choose from {', '.join(MODELS)}", file=sys.stderr)
                return 2
            results.append(bench_model(name, args, workdir))
    finally:
        if tmp is not None:
            tmp.cleanup()
    print()
    machine = machine_info(args.device)
    print(f"CPU: {machine.get('cpu')}, {machine['cpu_cores']} cores, AMX: {'yes' if machine['amx'] else 'no'}; "
          f"key flags: {' '.join(machine['cpu_key_flags'])}; torch {machine['torch']}, "
          f"openvino {machine['openvino']}, onnxruntime {machine['onnxruntime']}, sherpa-onnx {machine['sherpa_onnx']}")
    for r in results:
        if "b_pipeline" not in r:
            continue
        engine = r["b_pipeline"].get("engine") or {}
        print(f"{r['model']}: auto chose {engine.get('backend')}/{engine.get('dtype')} "
              f"(candidates {engine.get('candidates')}, probe ms {engine.get('probe_ms')})")
    print_table(results)
    print_peers(results)
    report = {"machine": machine, "command": " ".join(map(shlex.quote, sys.argv)),
              "quick": args.quick, "extract_args": args.extract_args, "baseline_args": args.baseline_args,
              "dtype": args.dtype,
              "total_bench_s": round(time.perf_counter() - started, 1),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results}
    out = Path(args.json or ROOT / "bench" / "results" / f"throughput_{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float))
    print(f"\nbench took {report['total_bench_s']:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
