"""Stage 1: one rank's share of the utterances -> embeddings under ``output_dir/rank_XX``.

Runs as plain ``python`` (one rank) or under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK, any
number of nodes sharing ``output_dir``). Rank 0 scans the tree and saves ``scan.json``; every rank
takes its duration-balanced shard, skips what an earlier run already flushed, and writes its
results atomically as it goes.
"""
import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from speakerlab import data as data_mod
from speakerlab.audio import AudioError, load_audio
from speakerlab.batching import pad_waves, plan_batches
from speakerlab.config import ConfigError, load_config
from speakerlab.embedder import DTYPES, Embedder, default_dtype
from speakerlab.models import ModelLoadError, file_sha256, load_model
from speakerlab.store import RankStore, atomic_write_json, read_json

log = logging.getLogger("speakerlab")


class UsageError(Exception):
    """Bad arguments or inputs: one clear line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Extract speaker embeddings (one torchrun rank).")
    p.add_argument("--data_root", required=True, help="data_root/<dataset>/<speaker>/<utt>.<wav|flac|ogg|mp3>")
    p.add_argument("--output_dir", required=True, help="per-rank results go to output_dir/rank_XX/")
    p.add_argument("--model_path", default=None,
                   help="checkpoint (state_dict); default: the embedded CAM++ zh/en common model")
    p.add_argument("--config_file", default=None, help="3D-Speaker style model YAML (see conf/)")
    p.add_argument("--use_gpu", action="store_true", help="run on CUDA when available (CPU otherwise)")
    p.add_argument("--gpu", type=int, nargs="+", default=[0], help="GPU ids; rank uses gpu[LOCAL_RANK %% len]")
    p.add_argument("--batch_size", type=int, default=128, help="most utterances in one batch")
    p.add_argument("--batch_frames", type=int, default=None,
                   help="padded feature frames per batch (10 ms each); default 3000 on CPU, 120000 on GPU")
    p.add_argument("--num_workers", type=int, default=-1, help="decode worker processes; -1 = auto")
    p.add_argument("--dtype", choices=["auto"] + list(DTYPES), default="auto",
                   help="model precision; auto = bf16 on GPUs and on CPUs with native bf16, else fp32")
    p.add_argument("--channels", choices=["first", "mean"], default="first",
                   help="multi-channel audio: first channel (3D-Speaker) or the mean of all")
    p.add_argument("--max_chunk_s", type=float, default=300.0,
                   help="longer files are embedded in equal chunks of at most this length, averaged")
    p.add_argument("--flush_every", type=int, default=1000, help="flush results every N utterances")
    p.add_argument("--flush_seconds", type=float, default=60.0, help="... or every N seconds")
    p.add_argument("--header_threads", type=int, default=16, help="threads reading audio headers")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results in output_dir")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any file fails")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


# --- environment ---------------------------------------------------------------------------
def rank_info():
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun without torchrun
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)
    else:
        rank, world, local, local_world = 0, 1, 0, 1
    return rank, world, local, local_world


def pick_device(use_gpu: bool, gpus: List[int], local_rank: int) -> torch.device:
    if use_gpu:
        if torch.cuda.is_available():
            index = gpus[local_rank % len(gpus)]
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        log.warning("--use_gpu given but CUDA is not available: running on CPU")
    return torch.device("cpu")


def cpu_plan(num_workers: int, local_world: int, device: torch.device):
    """Split this machine's cores between decode workers and the model's threads.

    Measured on 2 cores (bench/): decoding is ~5% of the model's time, so on CPU one worker
    overlapping I/O with the model, and all cores for the model's threads, is best. On GPU the
    model is fast and decode is the bottleneck, so workers get the rank's share of the cores.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // max(1, local_world))
    if num_workers < 0:
        num_workers = max(1, min(share - 1, 8)) if device.type == "cuda" else (1 if share <= 8 else 2)
    threads = share if device.type == "cpu" else max(1, min(4, share - num_workers))
    return num_workers, threads


# --- scan ----------------------------------------------------------------------------------
def scan_path(output_dir: Path) -> Path:
    return output_dir / "scan.json"


def prepare_scan(args, output_dir: Path, rank: int, world: int, dist_ready: bool) -> data_mod.ScanResult:
    path = scan_path(output_dir)
    data_root = str(Path(args.data_root).absolute())
    if rank == 0:
        scan = None
        if path.is_file() and not args.overwrite:
            scan = data_mod.load_scan(path)
            if scan.data_root != data_root:
                raise UsageError(f"{output_dir} holds a scan of {scan.data_root}, not {data_root}; "
                                 "use another --output_dir or --overwrite")
            log.info("reusing %s (%d utterances)", path, len(scan.utterances))
        else:
            started = time.time()
            scan = data_mod.scan_tree(data_root)
            if not scan.utterances:
                raise UsageError(f"no audio files found under {data_root} (expected "
                                 "<dataset>/<speaker>/<utterance>.wav|flac|ogg|mp3)")
            data_mod.read_headers(scan.utterances, args.header_threads)
            data_mod.save_scan(scan, path)
            log.info("scanned %d utterances in %.1f s", len(scan.utterances), time.time() - started)
    if world > 1:
        if dist_ready:
            torch.distributed.barrier()
        else:  # srun without a process group: wait for rank 0's file
            while not path.is_file():
                time.sleep(2)
        if rank != 0:
            scan = data_mod.load_scan(path)
    return scan


# --- decoding in workers -------------------------------------------------------------------
class WaveDataset(torch.utils.data.Dataset):
    def __init__(self, utterances, sample_rate: int, channels: str):
        self.utterances = utterances
        self.sample_rate = sample_rate
        self.channels = channels

    def __len__(self):
        return len(self.utterances)

    def __getitem__(self, index):
        utt = self.utterances[index]
        try:
            return index, load_audio(utt.path, self.sample_rate, self.channels, utt.start, utt.end)
        except AudioError as exc:
            return index, exc
        except Exception as exc:  # anything unforeseen is still one file's failure, not the rank's
            return index, AudioError(utt.path, "decode", f"{type(exc).__name__}: {exc}")


def collate(items):
    good = [(i, w) for i, w in items if not isinstance(w, AudioError)]
    bad = [(i, w) for i, w in items if isinstance(w, AudioError)]
    waves, lengths = pad_waves([w for _, w in good])
    return [i for i, _ in good], waves, lengths, bad


# --- identity ------------------------------------------------------------------------------
def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("soundfile", "soxr"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            pass
    return out


def keys_digest(utterances) -> str:
    digest = hashlib.sha1()
    for utt in utterances:
        digest.update(utt.key.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def describe_difference(old: dict, new: dict) -> str:
    fields = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fields)


def resolve_model(args):
    from speakerlab import zoo
    if args.model_path is None:
        config_file = args.config_file or zoo.DEFAULT_MODEL_CONFIG
        try:
            return zoo.default_model_path(), config_file, zoo.DEFAULT_MODEL_NAME
        except zoo.AssetError as exc:
            raise UsageError(str(exc)) from None
    if args.config_file is None:
        raise UsageError("--model_path needs --config_file (a model YAML, e.g. conf/eres2netv2.yaml)")
    return Path(args.model_path), args.config_file, Path(args.model_path).name


# --- main ----------------------------------------------------------------------------------
def run(args) -> int:
    rank, world, local_rank, local_world = rank_info()
    output_dir = Path(args.output_dir)
    started = datetime.now(timezone.utc)
    if not Path(args.data_root).is_dir():
        raise UsageError(f"--data_root {args.data_root} is not a directory")
    model_path, config_file, model_name = resolve_model(args)
    try:
        config = load_config(config_file)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    device = pick_device(args.use_gpu, args.gpu, local_rank)
    num_workers, threads = cpu_plan(args.num_workers, local_world, device)
    torch.set_num_threads(threads)
    dtype = default_dtype(device) if args.dtype == "auto" else args.dtype
    try:
        model = load_model(config, model_path)
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from None
    embedder = Embedder(model, config, device, dtype=dtype,
                        max_chunk_frames=int(args.max_chunk_s * 100))
    output_dir.mkdir(parents=True, exist_ok=True)

    dist_ready = False
    if world > 1 and "MASTER_ADDR" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=timedelta(hours=12))
        dist_ready = True
    try:
        scan = prepare_scan(args, output_dir, rank, world, dist_ready)
    finally:
        if dist_ready:
            torch.distributed.destroy_process_group()
    if rank == 0:
        stale = [p.name for p in output_dir.glob("rank_*")
                 if p.is_dir() and p.name[5:].isdigit() and int(p.name[5:]) >= world]
        if stale and not args.overwrite:
            raise UsageError(f"{output_dir} holds results of more ranks ({', '.join(sorted(stale))}) than "
                             f"this run's world size {world}; rerun with the same world size or --overwrite")
    shard = data_mod.shard_by_duration(scan.utterances, rank, world)
    model_identity = {"name": model_name, "checkpoint": str(model_path),
                      "sha256": file_sha256(model_path), "config": config.to_dict()}
    fingerprint = {"model_sha256": model_identity["sha256"], "model_config": config.to_dict(),
                   "features": embedder.fbank.describe(), "dtype": dtype, "channels": args.channels,
                   "max_chunk_s": args.max_chunk_s, "data_root": scan.data_root, "world_size": world,
                   "rank": rank, "num_utterances": len(scan.utterances), "keys_sha1": keys_digest(scan.utterances)}

    store = RankStore(output_dir, rank)
    previous = store.read_metadata()
    if previous is not None and previous.get("fingerprint") != fingerprint:
        if not args.overwrite:
            raise UsageError(f"{store.dir} was made differently ({describe_difference(previous.get('fingerprint') or {}, fingerprint)}); "
                             "use another --output_dir or --overwrite")
        store.wipe()
    elif args.overwrite:
        store.wipe()
    elif previous is not None and previous.get("complete"):
        log.info("rank %d: already complete (%d embedded, %d failed); nothing to do",
                 rank, previous["counts"]["embedded"], previous["counts"]["failed"])
        return exit_status(previous["counts"]["embedded"], previous["counts"]["failed"], args.strict)
    store.dir.mkdir(parents=True, exist_ok=True)
    metadata = {"rank": rank, "world_size": world, "complete": False, "fingerprint": fingerprint,
                "model": model_identity, "started": started.isoformat(), "command": sys.argv,
                "device": str(device), "dtype": dtype, "versions": versions(),
                "batch_policy": {"batch_frames": None, "batch_size": args.batch_size}}
    atomic_write_json(store.metadata_path, metadata)
    store.load_parts()
    done = store.done_keys()
    todo = [u for u in shard if u.key not in done]
    if done:
        log.info("rank %d: resuming, %d of %d utterances already done", rank, len(done), len(shard))

    batch_frames = args.batch_frames or (120000 if device.type == "cuda" else 3000)
    metadata["batch_policy"]["batch_frames"] = batch_frames
    sr = config.sample_rate
    est = [int(u.num_samples * sr / u.sample_rate) if u.sample_rate else 0 for u in todo]
    batches = plan_batches(est, batch_frames, args.batch_size)
    loader = torch.utils.data.DataLoader(
        WaveDataset(todo, sr, args.channels), batch_sampler=batches, num_workers=num_workers,
        collate_fn=collate, pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None)
    log.info("rank %d/%d on %s (%s): %d utterances to do, %d decode workers, %d threads, batches of "
             "<= %d frames", rank, world, device, dtype, len(todo), num_workers, threads, batch_frames)

    progress = make_progress(len(shard), len(done), rank, local_rank, args.no_progress)
    audio_seconds = 0.0
    for indices, waves, lengths, bad in loader:
        for index, error in bad:
            store.fail(failure_record(todo[index], error.stage, error.reason))
        if indices:
            try:
                results = embedder.embed(waves, lengths)
            except Exception as exc:  # a model crash fails this batch's files, never the rank
                log.error("batch of %d failed in the model: %s", len(indices), exc)
                results = None
            for position, index in enumerate(indices):
                utt = todo[index]
                if results is None:
                    store.fail(failure_record(utt, "model", f"model error: {exc}"))
                    continue
                result = results[position]
                if result.error:
                    store.fail(failure_record(utt, *result.error))
                else:
                    seconds = int(lengths[position]) / sr
                    audio_seconds += seconds
                    store.add(utt.key, result.embedding,
                              {"seconds": round(seconds, 4)} if result.chunks == 1 else
                              {"seconds": round(seconds, 4), "chunks": result.chunks})
        progress.update(len(indices) + len(bad))
        progress.set_postfix_str(f"{audio_seconds / 3600:.2f} h audio", refresh=False)
        store.maybe_flush(args.flush_every, args.flush_seconds)
    progress.close()
    store.flush()

    utt_by_key = {u.key: u for u in shard}
    embedded = len(store.keys)
    failed = len(store.failures)
    finished = datetime.now(timezone.utc)
    metadata.update({
        "complete": True, "finished": finished.isoformat(),
        "elapsed_s": round((finished - started).total_seconds(), 3),
        "embedding_dimension": int(store.embeddings[0].shape[0]) if store.embeddings else None,
        "counts": {"assigned": len(shard), "embedded": embedded, "failed": failed},
        "audio_seconds": round(sum(store.extra.get(k, {}).get("seconds", utt_by_key[k].duration)
                                   for k in store.keys), 3),
        "failures": store.failures,
    })
    store.finalize(utt_by_key, metadata)
    if failed:
        log.warning("rank %d: %d of %d files failed (see %s)", rank, failed, len(shard), store.metadata_path)
    log.info("rank %d: done, %d embedded, %d failed", rank, embedded, failed)
    return exit_status(embedded, failed, args.strict)


def failure_record(utt, stage: str, reason: str) -> dict:
    return {"key": utt.key, "path": utt.path, "stage": stage, "reason": reason}


def exit_status(embedded: int, failed: int, strict: bool) -> int:
    if failed and (strict or embedded == 0):
        return 1
    return 0


def make_progress(total: int, initial: int, rank: int, position: int, disabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=f"rank {rank}", unit="utt", position=position,
                dynamic_ncols=True, mininterval=1.0, disable=disabled)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (UsageError, data_mod.DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
