"""Stage 1: one rank's share of the utterances -> embeddings under ``output_dir/rank_XX``.

Runs as plain ``python`` (one rank), under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK, any
number of nodes sharing ``output_dir``) or as ``srun`` tasks (SLURM_PROCID / SLURM_NTASKS). Rank 0
reads the input (a tree, a manifest or a Kaldi data dir) and saves ``scan.json``; every rank takes
its duration-balanced shard, skips what an earlier run already flushed, and writes its results
atomically as it goes, only under its own ``rank_XX``.
"""
import argparse
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from speakerlab import data as data_mod
from speakerlab import manifest as manifest_mod
from speakerlab.audio import AudioError, load_audio
from speakerlab.batching import pad_waves, plan_batches
from speakerlab.config import ConfigError, load_config
from speakerlab.embedder import DTYPES, Embedder, Result, default_batch_frames, default_dtype
from speakerlab.models import ModelLoadError, file_sha256, load_model
from speakerlab.store import RankStore, atomic_write_json, read_json

log = logging.getLogger("speakerlab")


class UsageError(Exception):
    """Bad arguments or inputs: one clear line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Extract speaker embeddings (one torchrun rank).")
    p.add_argument("--data_root", default=None,
                   help="data_root/<dataset>/<speaker>/<utt>.<wav|flac|ogg|mp3>; with --manifest or --kaldi_dir: "
                        "the folder that relative audio paths start from")
    p.add_argument("--manifest", default=None,
                   help="CSV/TSV/JSONL list instead of a tree: columns path, speaker, dataset [, utterance, start, end]")
    p.add_argument("--kaldi_dir", default=None,
                   help="Kaldi data dir instead of a tree: wav.scp, utt2spk [, segments]")
    p.add_argument("--dataset", default=None,
                   help="dataset name for --kaldi_dir (default: the dir's name) or manifest rows without one")
    p.add_argument("--output_dir", required=True, help="per-rank results go to output_dir/rank_XX/")
    p.add_argument("--model_path", default=None,
                   help="checkpoint (state_dict); default: the embedded CAM++ zh/en common model")
    p.add_argument("--config_file", default=None, help="3D-Speaker style model YAML (see conf/)")
    p.add_argument("--use_gpu", action="store_true", help="run on CUDA when available (CPU otherwise)")
    p.add_argument("--gpu", type=int, nargs="+", default=[0], help="GPU ids; rank uses gpu[LOCAL_RANK %% len]")
    p.add_argument("--batch_size", type=int, default=128, help="most utterances in one batch")
    p.add_argument("--batch_frames", type=int, default=None,
                   help="padded feature frames per batch (10 ms each); default 120000 on GPU; on CPU 6000, "
                        "or 1 (one utterance per batch) for ERes2Net models")
    p.add_argument("--num_workers", type=int, default=-1, help="decode worker processes; -1 = auto")
    p.add_argument("--streams", type=int, default=-1,
                   help="CPU only: batches run concurrently, each single-threaded; -1 = auto (one per core, <= 16)")
    p.add_argument("--dtype", choices=["auto"] + list(DTYPES), default="auto",
                   help="model precision; auto = bf16 on GPUs and on CPUs with native bf16, else fp32")
    p.add_argument("--length_grid", choices=["auto", "on", "off"], default="auto",
                   help="pad batches to one of 16 lengths per octave (<= 6.25%% more frames) so batch shapes "
                        "repeat and oneDNN reuses its kernels; auto = on for CPU, off for GPU")
    p.add_argument("--no_fusion", action="store_true",
                   help="run conv, BatchNorm and activation as separate ops, as the reference does "
                        "(slower; fused is the same function, see speakerlab/models/fusion.py)")
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
    p.add_argument("--scan_timeout", type=float, default=12 * 3600,
                   help="seconds the other ranks wait for rank 0's scan of the input")
    p.add_argument("--check_only", action="store_true",
                   help="check the input, model, config and output dir, then exit: 0 if all is well, else "
                        "2 with the reason (the driver runs this in one process before torchrun)")
    return p


# --- environment ---------------------------------------------------------------------------
def rank_info():
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):  # srun, no torchrun
        rank = int(env["SLURM_PROCID"])
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
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


def cpu_plan(num_workers: int, local_world: int, device: torch.device, streams: int = -1):
    """Split this rank's share of the cores: (decode workers, model threads per stream, streams).

    GPU: the model is fast and decoding is the bottleneck, so workers get the cores.
    CPU (measured on 2 cores, bench/): the model is the bottleneck and runs fastest as several
    single-threaded streams, one batch each, rather than one batch spread over all cores: CPU
    work per batch is many small ops, and with two or more intra-op threads every op ends in a
    barrier where a thread that the OS has preempted (for a decode worker, or any other process)
    stalls the others -- on a busy 2-core machine that cost the model up to 30x. One stream per
    core (at most 16; beyond that streams get several threads), and one decode worker per 8 cores
    (decoding is ~5% of the model's work on CPU).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // max(1, local_world))
    if device.type == "cuda":
        if num_workers < 0:
            num_workers = max(1, min(share - 1, 8))
        return num_workers, max(1, min(4, share - num_workers)), 1
    if num_workers < 0:
        num_workers = max(1, min(8, share // 8))
    if streams < 1:
        streams = min(share, 16)
    return num_workers, max(1, share // streams), streams


class ModelStreams:
    """Run ``embedder.embed`` on batches in ``streams`` threads, yielding results in input order.

    Each thread runs its batch's fbank and model single-threaded (``threads`` intra-op threads);
    torch releases the GIL inside ops, so streams use separate cores. Batches of more than
    ``max(batch_frames, 12000)`` frames (files over 2 minutes) run one at a time, so the memory
    peak stays that of one long file.
    """

    def __init__(self, embedder: Embedder, streams: int, threads: int, batch_frames: int):
        self.embedder = embedder
        self.streams = max(1, streams)
        self.threads = threads
        self.batch_frames = batch_frames
        self._oversized = threading.Lock()

    def _embed(self, waves, lengths):
        frames = waves.shape[1] // self.embedder.fbank.config.frame_shift
        if self.streams > 1 and frames > max(self.batch_frames, 12000):
            with self._oversized:
                return embed_batch(self.embedder, waves, lengths)
        return embed_batch(self.embedder, waves, lengths)

    def map(self, loader):
        """Yield (batch, [Result per utterance]) for each loader batch, in loader order."""
        if self.streams == 1:
            for batch in loader:
                yield batch, (self._embed(batch[1], batch[2]) if batch[0] else [])
            return
        window = deque()
        with ThreadPoolExecutor(self.streams, initializer=torch.set_num_threads,
                                initargs=(self.threads,)) as pool:
            for batch in loader:
                window.append((batch, pool.submit(self._embed, batch[1], batch[2]) if batch[0] else None))
                while len(window) > 2 * self.streams:  # keep every stream busy, a few queued
                    done, future = window.popleft()
                    yield done, future.result() if future else []
            while window:
                done, future = window.popleft()
                yield done, future.result() if future else []


# --- scan ----------------------------------------------------------------------------------
# Rank 0 alone reads the input and writes scan.json (atomically); the other ranks wait for it, then
# load it. With a process group (torchrun, or MASTER_ADDR/MASTER_PORT set under srun) rank 0's
# outcome is broadcast; without one (plain srun) rank 0 publishes it in scan.ready.json tagged with
# this run's id (the Slurm job/step/restart), so a stale scan.json or marker of an earlier run is
# never taken for this one, and rank 0's errors reach every rank instead of leaving them waiting.
def scan_path(output_dir: Path) -> Path:
    return output_dir / "scan.json"


def ready_path(output_dir: Path) -> Path:
    return output_dir / "scan.ready.json"


def group_env() -> bool:
    """Whether the ranks can form a process group (torchrun sets these; under srun, the user may)."""
    return "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ


def run_id() -> Optional[str]:
    env = os.environ
    if env.get("SPEAKERLAB_RUN_ID"):
        return env["SPEAKERLAB_RUN_ID"]
    if env.get("SLURM_JOB_ID"):
        step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "-"))
        return f"slurm-{env['SLURM_JOB_ID']}.{step}.{env.get('SLURM_RESTART_COUNT', '0')}"
    return None


def scan_on_rank0(args, source: dict, output_dir: Path, world: int) -> data_mod.ScanResult:
    path = scan_path(output_dir)
    if path.is_file() and not args.overwrite:
        scan = data_mod.load_scan(path)
        change = manifest_mod.source_changed(scan.source, source)
        if change:
            raise UsageError(f"{output_dir} cannot be resumed: {change}; use another --output_dir or --overwrite")
        if source["type"] == "tree":  # manifests and Kaldi dirs are checked by their hash above
            check_tree_unchanged(scan, source, output_dir)
        log.info("reusing %s (%d utterances)", path, len(scan.utterances))
    else:
        started = time.time()
        scan = manifest_mod.scan_source(source)
        if not scan.utterances:
            raise UsageError(f"no audio files found under {source['path']} (expected "
                             "<dataset>/<speaker>/<utterance>.wav|flac|ogg|mp3)")
        data_mod.read_headers(scan.utterances, args.header_threads)
        data_mod.save_scan(scan, path)
        log.info("scanned %d utterances in %.1f s", len(scan.utterances), time.time() - started)
    for error in scan.errors:
        log.warning("scan: %s: %s", error["path"], error["reason"])
    stale = sorted(p for p in output_dir.glob("rank_*")
                   if p.is_dir() and p.name[5:].isdigit() and int(p.name[5:]) >= world)
    if stale and not args.overwrite:
        raise UsageError(f"{output_dir} holds results of more ranks ({', '.join(p.name for p in stale)}) than "
                         f"this run's world size {world}; rerun with the same world size or --overwrite")
    for directory in stale:  # --overwrite: results of a larger earlier run must not reach the merge
        shutil.rmtree(directory, ignore_errors=True)
    return scan


def check_tree_unchanged(scan: data_mod.ScanResult, source: dict, output_dir: Path) -> None:
    """Walk the tree again (no header reads: ~6 s per million files) so that files added or removed
    since scan.json was written are not silently left out of, or kept in, a resumed run."""
    started = time.time()
    fresh = manifest_mod.scan_source(source)
    old = {u.key: u.path for u in scan.utterances}
    new = {u.key: u.path for u in fresh.utterances}
    added = sorted(k for k in new if old.get(k) != new[k])
    gone = sorted(k for k in old if k not in new)
    if added or gone:
        def some(keys):
            return ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")
        parts = ([f"{len(added)} new or moved (e.g. {some(added)})"] if added else []) + \
                ([f"{len(gone)} gone (e.g. {some(gone)})"] if gone else [])
        raise UsageError(f"{output_dir} cannot be resumed: {source['path']} changed since it was scanned: "
                         f"{'; '.join(parts)}. Use --overwrite to redo it all, or extract the new files into "
                         "another --output_dir (a --manifest can list them) and merge both output dirs")
    log.info("the tree still matches %s (checked in %.1f s)", scan_path(output_dir), time.time() - started)


def wait_for_rank0(output_dir: Path, identity: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    next_note = time.monotonic() + 60
    while True:
        try:
            marker = read_json(ready_path(output_dir))
            if marker.get("run_id") == identity:
                return marker
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise UsageError(f"rank 0 did not finish scanning the input within {timeout:.0f} s "
                             f"(no {ready_path(output_dir)} for run {identity}); did rank 0 start and survive?")
        if time.monotonic() > next_note:
            log.info("waiting for rank 0 to scan the input (run %s)", identity)
            next_note = time.monotonic() + 300
        time.sleep(2.0)


def prepare_scan(args, source: dict, output_dir: Path, rank: int, world: int,
                 dist_ready: bool) -> data_mod.ScanResult:
    identity = run_id() if world > 1 and not dist_ready else None
    if world > 1 and not dist_ready and identity is None:
        raise UsageError(f"{world} ranks but no way to coordinate them: set MASTER_ADDR and MASTER_PORT (a process "
                         "group), or run under Slurm, or set SPEAKERLAB_RUN_ID to one value on every rank")
    scan, problem, unexpected = None, "", None
    if rank == 0:
        if identity is not None:
            ready_path(output_dir).unlink(missing_ok=True)
        try:
            scan = scan_on_rank0(args, source, output_dir, world)
        except (UsageError, data_mod.DataError) as exc:
            problem = str(exc)
        except Exception as exc:  # told to the other ranks, then raised here with its traceback
            problem, unexpected = f"rank 0 failed while scanning: {type(exc).__name__}: {exc}", exc
    if world > 1:
        if dist_ready:
            box = [problem, scan_digest(scan) if scan else ""]
            torch.distributed.broadcast_object_list(box, src=0)
            problem, digest = box
        elif rank == 0:
            digest = scan_digest(scan) if scan else ""
            atomic_write_json(ready_path(output_dir), {"run_id": identity, "error": problem, "scan_sha1": digest,
                                                       "time": datetime.now(timezone.utc).isoformat()})
        else:
            marker = wait_for_rank0(output_dir, identity, args.scan_timeout)
            problem, digest = marker.get("error", ""), marker.get("scan_sha1", "")
    if unexpected is not None:
        raise unexpected
    if problem:
        raise UsageError(problem if rank == 0 else f"rank 0: {problem}")
    if rank != 0:
        scan = load_published_scan(scan_path(output_dir), digest)
    return scan


def scan_digest(scan: data_mod.ScanResult) -> str:
    """What sharding depends on: every utterance's key, audio, segment and length."""
    digest = hashlib.sha1()
    for u in scan.utterances:
        digest.update(f"{u.key}\0{u.path}\0{u.start}\0{u.end}\0{u.sample_rate}\0{u.num_samples}\n"
                      .encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def load_published_scan(path: Path, digest: str, patience: float = 120.0) -> data_mod.ScanResult:
    """Rank 0's scan.json, checked against the digest it announced. A shared filesystem's client cache
    may show the previous file for a while after rank 0 replaced it, so mismatches are retried."""
    deadline = time.monotonic() + patience
    while True:
        try:
            scan = data_mod.load_scan(path)
            if scan_digest(scan) == digest:
                return scan
            problem = "it differs from the one rank 0 announced"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problem = f"unreadable ({exc})"
        if time.monotonic() > deadline:
            raise UsageError(f"{path} is not the scan rank 0 made for this run: {problem} (another run "
                             "writing to the same --output_dir?)")
        time.sleep(2.0)


# --- decoding in workers -------------------------------------------------------------------
class DecodeJournal:
    """Which file each decode worker process is decoding, one small file per worker pid.

    A decoder that crashes the process (a segfault in a codec library, the kernel's OOM killer)
    leaves no Python exception to catch; the journal of the dead pid names its file, so that file is
    listed as failed and the rank goes on without it instead of dying on it at every rerun.
    """

    WIDTH = 16

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self._fd = None
        self._pid = None

    def _open(self):
        if self._pid != os.getpid():  # first use in this (forked) worker
            self.dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.dir / str(os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._pid = os.getpid()
        return self._fd

    def start(self, index: int) -> None:
        os.pwrite(self._open(), f"{index:>{self.WIDTH}}".encode(), 0)

    def finish(self) -> None:
        os.pwrite(self._open(), b" " * self.WIDTH, 0)

    def current(self, pid: int) -> Optional[int]:
        try:
            text = (self.dir / str(pid)).read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def forget(self, pid: int) -> None:
        (self.dir / str(pid)).unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class WaveDataset(torch.utils.data.Dataset):
    def __init__(self, utterances, sample_rate: int, channels: str, journal: Optional[DecodeJournal] = None):
        self.utterances = utterances
        self.sample_rate = sample_rate
        self.channels = channels
        self.journal = journal

    def __len__(self):
        return len(self.utterances)

    def __getitem__(self, index):
        utt = self.utterances[index]
        if self.journal is not None:
            self.journal.start(index)
        try:
            return index, load_audio(utt.path, self.sample_rate, self.channels, utt.start, utt.end)
        except AudioError as exc:
            return index, exc
        except Exception as exc:  # anything unforeseen is still one file's failure, not the rank's
            return index, AudioError(utt.path, "decode", f"{type(exc).__name__}: {exc}")
        finally:
            if self.journal is not None:
                self.journal.finish()


_DEAD_WORKER = re.compile(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\) (exited unexpectedly|is killed by signal: .*)")


def dead_workers(exc: BaseException):
    """(pids, how) of the decode workers a DataLoader error reports dead, or None for other errors."""
    match = _DEAD_WORKER.search(str(exc))
    if not match:
        return None
    pids = [int(p) for p in re.findall(r"\d+", match.group(1))]
    return pids, match.group(2).rstrip(". ")


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
    if (args.manifest is not None) + (args.kaldi_dir is not None) > 1 or (
            args.data_root is None and args.manifest is None and args.kaldi_dir is None):
        raise UsageError("give exactly one input: --data_root DIR (a tree), --manifest FILE or --kaldi_dir DIR")
    source = manifest_mod.describe_source(args.data_root, args.manifest, args.kaldi_dir, args.dataset)
    model_path, config_file, model_name = resolve_model(args)
    try:
        config = load_config(config_file)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    device = pick_device(args.use_gpu, args.gpu, local_rank)
    num_workers, threads, streams = cpu_plan(args.num_workers, local_world, device, args.streams)
    torch.set_num_threads(threads)
    dtype = default_dtype(device) if args.dtype == "auto" else args.dtype
    try:
        model = load_model(config, model_path)
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from None
    if args.check_only:
        from speakerlab.checks import writable_dir_problem
        problem = writable_dir_problem(output_dir, "--output_dir")
        if problem:
            raise UsageError(problem)
        log.info("arguments OK: input %s, model %s, output dir %s", source["path"], model_name, output_dir.absolute())
        return 0
    embedder = Embedder(model, config, device, dtype=dtype,
                        max_chunk_frames=int(args.max_chunk_s * 100), fuse=not args.no_fusion,
                        grid=None if args.length_grid == "auto" else args.length_grid == "on")
    output_dir.mkdir(parents=True, exist_ok=True)

    dist_ready = False
    if world > 1 and group_env() and not torch.distributed.is_initialized():
        # rank and world given explicitly: under srun only SLURM_* say them, RANK/WORLD_SIZE are unset
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                             timeout=timedelta(seconds=max(args.scan_timeout, 60)))
        dist_ready = True
    try:
        scan = prepare_scan(args, source, output_dir, rank, world, dist_ready)
    finally:
        if dist_ready:
            torch.distributed.destroy_process_group()
    shard = data_mod.shard_by_duration(scan.utterances, rank, world)
    model_identity = {"name": model_name, "checkpoint": str(model_path),
                      "sha256": file_sha256(model_path), "config": config.to_dict()}
    fingerprint = {"model_sha256": model_identity["sha256"], "model_config": config.to_dict(),
                   "features": embedder.fbank.describe(), "dtype": dtype, "channels": args.channels,
                   "max_chunk_s": args.max_chunk_s, "data_root": scan.data_root, "source": scan.source,
                   "world_size": world,
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
        counts = previous["counts"]
        log.info("rank %d: already complete (%d embedded, %d failed); nothing to do (--overwrite redoes it)",
                 rank, counts["embedded"], counts["failed"])
        if counts["failed"]:
            log.warning("rank %d: %d of %d files failed (see %s)", rank, counts["failed"], counts["assigned"],
                        store.metadata_path)
        return exit_status(counts["embedded"], counts["failed"], args.strict, scan_errors(scan, rank))
    store.dir.mkdir(parents=True, exist_ok=True)
    metadata = {"rank": rank, "world_size": world, "complete": False, "fingerprint": fingerprint,
                "model": model_identity, "started": started.isoformat(), "command": sys.argv,
                "device": str(device), "dtype": dtype, "versions": versions(),
                "batch_policy": {"batch_frames": None, "batch_size": args.batch_size,
                                 "fused": not args.no_fusion, "length_grid": embedder.grid}}
    atomic_write_json(store.metadata_path, metadata)
    store.load_parts()
    done = store.done_keys()
    todo = [u for u in shard if u.key not in done]
    if done:
        log.info("rank %d: resuming, %d of %d utterances already done", rank, len(done), len(shard))

    batch_frames = args.batch_frames or default_batch_frames(device, model)
    metadata["batch_policy"]["batch_frames"] = batch_frames
    sr = config.sample_rate
    est = [int(u.num_samples * sr / u.sample_rate) if u.sample_rate else 0 for u in todo]
    journal = DecodeJournal(store.dir / "decoding") if num_workers > 0 else None
    if journal is not None:
        journal.clear()  # an earlier run's; a fresh one per run
    log.info("rank %d/%d on %s (%s): %d utterances to do, %d decode workers, %d model stream(s) x %d "
             "thread(s), batches of <= %d frames", rank, world, device, dtype, len(todo), num_workers,
             streams, threads, batch_frames)
    metadata["batch_policy"].update({"streams": streams, "threads": threads, "num_workers": num_workers})

    progress = make_progress(len(shard), len(done), rank, local_rank, args.no_progress)
    audio_seconds = 0.0
    left = list(range(len(todo)))
    for attempt in range(MAX_DECODER_CRASHES + 1):
        # Longest batches first: the run then ends on short batches, so concurrent model streams finish
        # together instead of one core idling while the other runs the longest file (measured: ~4%).
        batches = [[left[i] for i in batch] for batch in
                   plan_batches([est[i] for i in left], batch_frames, args.batch_size, grid=embedder.grid)[::-1]]
        loader = torch.utils.data.DataLoader(
            WaveDataset(todo, sr, args.channels, journal), batch_sampler=batches, num_workers=num_workers,
            collate_fn=collate, pin_memory=device.type == "cuda",
            prefetch_factor=4 if num_workers > 0 else None)
        try:
            for (indices, waves, lengths, bad), results in ModelStreams(embedder, streams, threads,
                                                                         batch_frames).map(loader):
                with signals_held():
                    for index, error in bad:
                        store.fail(failure_record(todo[index], error.stage, error.reason))
                    for position, index in enumerate(indices):
                        utt = todo[index]
                        result = results[position]
                        if result.error:
                            store.fail(failure_record(utt, *result.error))
                        else:
                            seconds = int(lengths[position]) / sr
                            audio_seconds += seconds
                            store.add(utt.key, result.embedding,
                                      {"seconds": round(seconds, 4)} if result.chunks == 1 else
                                      {"seconds": round(seconds, 4), "chunks": result.chunks})
                    store.maybe_flush(args.flush_every, args.flush_seconds)
                progress.update(len(indices) + len(bad))
                progress.set_postfix_str(f"{audio_seconds / 3600:.2f} h audio", refresh=False)
            break
        except RuntimeError as exc:
            store.repair()  # in case an add was cut short all the same
            handled = store.done_keys()
            left = [i for i in left if todo[i].key not in handled]
            culprits = crashed_files(exc, journal, set(left))
            if not culprits or attempt == MAX_DECODER_CRASHES:
                raise
            with signals_held():
                for index, how in culprits:
                    log.warning("rank %d: the decoder crashed on %s (%s); listed as failed, going on",
                                rank, todo[index].path, how)
                    store.fail(failure_record(todo[index], "decode", f"the decoder crashed on this file ({how})"))
                store.flush()
            culprit_set = {index for index, _ in culprits}
            left = [i for i in left if i not in culprit_set]
            progress.n = len(shard) - len(left)
            progress.refresh()
    if journal is not None:
        journal.clear()
    progress.close()
    with signals_held():
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
    return exit_status(embedded, failed, args.strict, scan_errors(scan, rank))


# A rank gives up (and a rerun resumes) after this many decoder crashes in one run.
MAX_DECODER_CRASHES = 100


def crashed_files(exc: BaseException, journal: Optional[DecodeJournal], pending) -> list:
    """[(index into todo, how)] for the pending files dead decode workers were on; [] if unknown.
    Each dead worker's journal is removed once read (a later worker may reuse its pid)."""
    dead = dead_workers(exc)
    if dead is None or journal is None:
        return []
    pids, how = dead
    found = []
    for pid in pids:
        index = journal.current(pid)
        journal.forget(pid)
        if index is not None and index in pending:
            found.append((index, how))
    return found


@contextmanager
def signals_held():
    """Hold SIGCHLD while results are written: torch's DataLoader raises a dead worker's error from
    its SIGCHLD handler, i.e. anywhere in the main thread; held, it surfaces right after instead of
    in the middle of a flush."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def scan_errors(scan, rank: int) -> int:
    """Directories the scan could not list and the like; rank 0 answers for them."""
    return len(scan.errors) if rank == 0 else 0


def embed_batch(embedder: Embedder, waves: torch.Tensor, lengths: torch.Tensor) -> List[Result]:
    """embedder.embed, but an exception in the model fails only the utterance that causes it: the
    batch is retried one utterance at a time, and the rank goes on."""
    try:
        return embedder.embed(waves, lengths)
    except Exception as exc:
        if dead_workers(exc) is not None:  # a decode worker died (raised from torch's SIGCHLD handler)
            raise
        if len(lengths) == 1:
            return [Result(error=("model", f"model error: {type(exc).__name__}: {exc}"))]
        log.warning("a batch of %d failed in the model (%s: %s); retrying one by one",
                    len(lengths), type(exc).__name__, exc)
        return [embed_batch(embedder, waves[row:row + 1, :int(lengths[row])], lengths[row:row + 1])[0]
                for row in range(len(lengths))]


def failure_record(utt, stage: str, reason: str) -> dict:
    return {"key": utt.key, "path": utt.path, "stage": stage, "reason": reason}


def exit_status(embedded: int, failed: int, strict: bool, scan_problems: int = 0) -> int:
    """0 when something was embedded (failures are listed and warned about); 1 when nothing was,
    or with ``--strict`` when any file failed or the scan could not see everything."""
    if failed and (strict or embedded == 0):
        return 1
    return 1 if scan_problems and strict else 0


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
        tell_waiting_ranks(Path(args.output_dir), str(exc))
        sys.stderr.write(f"error: {exc}\n")  # one write: ranks sharing a terminal or pipe do not interleave it
        sys.stderr.flush()
        return 2
    except BaseException as exc:
        tell_waiting_ranks(Path(args.output_dir), f"{type(exc).__name__}: {exc}")
        raise


def tell_waiting_ranks(output_dir: Path, message: str) -> None:
    """Rank 0 failed before publishing its scan (no process group): say so, so others stop waiting."""
    rank, world, _, _ = rank_info()
    identity = run_id()
    if rank != 0 or world == 1 or identity is None or group_env() or not output_dir.is_dir():
        return
    try:
        if read_json(ready_path(output_dir)).get("run_id") == identity:
            return  # already published (the scan went through, or its error was told)
    except (OSError, ValueError):
        pass
    try:
        atomic_write_json(ready_path(output_dir), {"run_id": identity, "error": message, "scan_sha1": ""})
    except OSError:
        pass
