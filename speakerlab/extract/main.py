"""Stage 1: one rank's share of the utterances -> embeddings under ``output_dir/rank_XX``.

Runs as plain ``python`` (one rank), under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK, any
number of nodes sharing ``output_dir``) or as ``srun`` tasks (SLURM_PROCID / SLURM_NTASKS). Rank 0
reads the input (a tree, a manifest or a Kaldi data dir), the ranks share its header reads, and rank 0
saves the scan file; every rank takes
its duration-balanced shard, skips what an earlier run already flushed, and writes its results
atomically as it goes, only under its own ``rank_XX``. This module is the orchestration: parser ->
options -> run().
"""
import argparse
import dataclasses
import logging
import math
import os
import socket
import sys
from datetime import datetime, timezone
from typing import List, Optional

import numpy as np
import torch

from speakerlab import data as data_mod
from speakerlab import manifest as manifest_mod
from speakerlab import zoo
from speakerlab.config import ConfigError, load_config
from speakerlab.backends import BACKENDS
from speakerlab.embedder import DTYPES, Embedder, default_batch_frames, features_for, length_grid
from speakerlab.extract.coordinate import describe_os_error, shared_scan, tell_waiting_ranks
from speakerlab.extract.loader import DecodeJournal, dead_workers, quiet_workers
from speakerlab.extract.options import ExtractOptions, UsageError
from speakerlab.extract.runtime import cpu_plan, pick_device, rank_info, versions
from speakerlab.extract.worker import (EarlyStart, LoaderSpec, ShardPlan, SteadyRate, embed_shard, estimate_samples,
                                       shut_down, signals_held, start_batches)
from speakerlab.hostmem import HostMemoryError
from speakerlab.calibration import check_request
from speakerlab.embedder import check_engine_args
from speakerlab.models import ModelLoadError, check_checkpoint, load_model, model_class
from speakerlab.rundir import RankStore, RunDir, RunDirBusy, RunDirError, scan_fingerprint

log = logging.getLogger("speakerlab")


def _whole(low: int, auto: bool = False):
    """argparse type: a whole number >= ``low`` (or -1 = auto when ``auto``); a bad one is one usage line."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low and not (auto and value == -1):
            raise argparse.ArgumentTypeError(f"{value} is below {low}" + (" (or -1 = auto)" if auto else ""))
        return value
    return parse


def _seconds(allow_zero: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"{text} is not a {'non-negative' if allow_zero else 'positive'} "
                                             "number of seconds")
        return value
    return parse


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
    p.add_argument("--gpu", type=_whole(0), nargs="+", default=None,
                   help="GPU ids, one per rank on the node: rank uses gpu[LOCAL_RANK] (repeat an id to share a "
                        "GPU deliberately, e.g. --gpu 0 0); default: the LOCAL_RANK-th visible GPU")
    p.add_argument("--batch_size", type=_whole(1), default=None,
                   help="CPU: most utterances in one batch (default 128). GPU: ignored, the frame budget "
                        "(--batch_frames) alone sizes batches (short files make big batches)")
    p.add_argument("--batch_frames", type=_whole(1), default=None,
                   help="padded feature frames per batch (10 ms each); default 120000 on GPU; on CPU 6000, "
                        "or 1 (one utterance per batch) for ERes2Net models")
    p.add_argument("--num_workers", type=_whole(0, auto=True), default=-1, help="decode worker processes; -1 = auto")
    p.add_argument("--streams", type=_whole(1, auto=True), default=-1,
                   help="CPU only: batches run concurrently, each single-threaded; -1 = auto (one per core, <= 16)")
    p.add_argument("--dtype", choices=["auto"] + list(DTYPES), default="auto",
                   help="model precision; auto = bf16 on GPUs of compute capability >= 8.0 (7.x: fp16); on CPU "
                        "the faster of fp32 and bf16, measured on this machine and model (cached; see README)")
    p.add_argument("--backend", choices=["auto"] + list(BACKENDS), default="auto",
                   help="CPU model engine: torch, or openvino (pip install .[openvino]); auto = the faster, "
                        "measured with --dtype auto's calibration (OpenVINO when installed and faster)")
    p.add_argument("--length_grid", choices=["auto", "on", "off"], default="auto",
                   help="pad batches to one of 16 lengths per octave (<= 6.25%% more frames; GPU: 8, <= 12.5%%) "
                        "so batch shapes repeat and oneDNN / cuDNN reuse their set-up; auto = on")
    p.add_argument("--no_fusion", action="store_true",
                   help="run conv, BatchNorm and activation as separate ops, as the reference does "
                        "(slower; fused is the same function, see speakerlab/models/fusion.py)")
    p.add_argument("--channels", choices=["first", "mean"], default="first",
                   help="multi-channel audio: first channel (3D-Speaker) or the mean of all")
    p.add_argument("--max_chunk_s", type=_seconds(False), default=300.0,
                   help="longer files are embedded in equal chunks of at most this length, averaged")
    p.add_argument("--flush_every", type=_whole(1), default=1000, help="flush results every N utterances")
    p.add_argument("--flush_seconds", type=_seconds(True), default=60.0, help="... or every N seconds")
    p.add_argument("--header_threads", type=_whole(1), default=16, help="threads reading audio headers")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results in output_dir")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any file fails")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--scan_timeout", type=_seconds(False), default=12 * 3600,
                   help="seconds the other ranks wait for rank 0's scan of the input")
    p.add_argument("--check_only", action="store_true",
                   help="check the input, model, config and output dir, then exit: 0 if all is well, else "
                        "2 with the reason (the driver runs this in one process before torchrun)")
    return p


# --- the steps of a run ---------------------------------------------------------------------
def describe_input(options: ExtractOptions) -> dict:
    if (options.manifest is not None) + (options.kaldi_dir is not None) > 1 or (
            options.data_root is None and options.manifest is None and options.kaldi_dir is None):
        raise UsageError("give exactly one input: --data_root DIR (a tree), --manifest FILE or --kaldi_dir DIR")
    return manifest_mod.describe_source(options.data_root, options.manifest, options.kaldi_dir, options.dataset)


@dataclasses.dataclass
class ResolvedModel:
    """The options' model, checked but not loaded: its checkpoint, config and name."""
    path: object
    config: object
    name: str


def resolve_model(options: ExtractOptions, device: Optional[torch.device] = None) -> ResolvedModel:
    """What the options name, checked as far as a millisecond allows (the pipeline asks before its scan,
    so a wrong choice fails in a second): the checkpoint and config found, the config naming a known
    model, the checkpoint a whole torch file (``check_checkpoint``; reading it, 0.17 s, would delay the
    early decode workers), the dtype/backend servable on ``device``. Failures are UsageErrors."""
    try:
        model_path, config_file, model_name = zoo.resolve_model(options.model_path, options.config_file)
        config = load_config(config_file)
        model_class(config)
        check_checkpoint(model_path)
        if device is not None:
            check_engine_args(options.dtype, options.backend)
            check_request(options.dtype, options.backend, device)
    except (zoo.AssetError, zoo.ModelChoiceError, ConfigError, ModelLoadError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    return ResolvedModel(model_path, config, model_name)


def build_embedder(options: ExtractOptions, device: torch.device, streams: int = 1,
                   resolved: Optional[ResolvedModel] = None):
    """(embedder, model identity) for the options' model on ``device``; bad model choices are UsageErrors.
    ``resolved``: from ``resolve_model``, done already."""
    if resolved is None:
        resolved = resolve_model(options)
    model_path, config, model_name = resolved.path, resolved.config, resolved.name
    try:
        model = load_model(config, model_path)
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from None
    try:
        embedder = Embedder(model, config, device, dtype=options.dtype, backend=options.backend, streams=streams,
                            max_chunk_s=options.max_chunk_s, fuse=options.fuse, grid=options.grid)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    identity = {"name": model_name, "checkpoint": str(model_path), "sha256": zoo.sha256_of(model_path),
                "config": config.to_dict()}
    return embedder, identity


def shard_plan(options: ExtractOptions, batch_frames: int, device: torch.device, cpu, local_world: int) -> ShardPlan:
    num_workers, threads, streams = cpu
    return ShardPlan(batch_frames=batch_frames, batch_size=batch_size_cap(options.batch_size, device),
                     num_workers=num_workers, streams=streams, threads=threads, channels=options.channels,
                     flush_every=options.flush_every, flush_seconds=options.flush_seconds,
                     pin_memory=device.type == "cuda", processes_on_host=local_world)


def early_start(options: ExtractOptions, run_dir: RunDir, scan, rank: int, config, device: torch.device, cpu,
                local_world: int) -> Optional[EarlyStart]:
    """Start a fresh rank's decode workers on its whole shard before the model loads, so they decode
    on the cores the model load and compile leave idle (CAM++, 21 min of audio: the first 1.9 s of a
    7.9 s run had one busy core). Only where the to-do list is known without the model: a rank with
    no earlier run (no metadata), or one --overwrite redoes (it is wiped once the model has loaded, all
    but the workers' journal: open_rank_store); else None and the workers start later."""
    store = run_dir.store(rank)
    if cpu[0] <= 0 or not scan.utterances:
        return None
    if not options.overwrite and (store.read_metadata() is not None or store.dir.exists() and any(
            entry.name != run_dir.journal_dir(rank).name for entry in store.dir.iterdir())):
        return None  # resumed, complete or refused: decided once the engine is known (a decode
        # journal alone is what a run that failed before its metadata left: fresh all the same)
    spec = LoaderSpec(config.sample_rate, features_for(config) if device.type == "cpu" else None,
                      *length_grid(device, options.grid))
    plan = shard_plan(options, options.batch_frames or default_batch_frames(device, model_class(config)),
                      device, cpu, local_world)
    todo = scan.utterances
    journal = DecodeJournal(run_dir.journal_dir(rank))
    journal.clear()
    notes = {}
    try:
        batches = start_batches(todo, np.arange(len(todo)), estimate_samples(todo, spec.sample_rate), plan, spec,
                                journal, notes)
        # until embed_shard takes them over, a worker's death must not raise in the middle of the model
        # load or a metadata write (torch raises it from its SIGCHLD handler, wherever the main thread is)
        if not quiet_workers(batches):
            shut_down(batches)
            return None
    except RuntimeError as exc:
        if dead_workers(exc) is None:
            raise
        return None  # died at once: the workers start again later, and the crash is handled there
    return EarlyStart(batches, (spec.key(), plan), len(todo), notes)


def describe_difference(old: dict, new: dict) -> str:
    fields = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fields)


def open_rank_store(run_dir: RunDir, rank: int, fingerprint: dict, overwrite: bool, keep: Optional[str] = None):
    """(store, the earlier run's metadata when that run completed the rank): resume, wipe or refuse.
    A rank marked complete whose final files are gone or unreadable is redone. ``keep``: an entry of
    the rank's dir a wipe leaves (the journal of decode workers already started)."""
    store = run_dir.store(rank)
    previous = store.read_metadata()
    if previous is not None and previous.get("fingerprint") != fingerprint:
        if not overwrite:
            raise UsageError(f"{store.dir} was made differently ({describe_difference(previous.get('fingerprint') or {}, fingerprint)}); "
                             "use another --output_dir or --overwrite")
        store.wipe(keep)
    elif overwrite:
        store.wipe(keep)
    elif previous is not None and previous.get("complete"):
        problem = run_dir.check_rank_outputs(rank, previous)
        if not problem:
            return store, previous
        # the parts were dropped when the rank completed: what the damaged file held is redone
        log.warning("rank %d was complete, but %s: redoing the rank", rank, problem)
        store.wipe(keep)
    return store, None


def scan_errors(scan, rank: int) -> int:
    """Directories the scan could not list and the like; rank 0 answers for them."""
    return len(scan.errors) if rank == 0 else 0


def exit_status(embedded: int, failed: int, strict: bool, scan_problems: int = 0) -> int:
    """0 when something was embedded (failures are listed and warned about); 1 when nothing was,
    or with ``--strict`` when any file failed or the scan could not see everything."""
    if failed and (strict or embedded == 0):
        return 1
    return 1 if scan_problems and strict else 0


def batch_size_cap(batch_size: Optional[int], device: torch.device) -> Optional[int]:
    """Most utterances per batch: --batch_size (128) on CPU; none on GPU, where the frame budget alone
    sizes batches -- the seed's --batch_size 32 kept GPU batches far below the budget, so a CAM++
    forward was a few ms of kernel launches for little work."""
    if device.type == "cuda":
        if batch_size is not None:
            log.info("--batch_size %d ignored on GPU: the frame budget (--batch_frames) sizes batches", batch_size)
        return None
    return 128 if batch_size is None else batch_size


def make_progress(total: int, initial: int, rank: int, position: int, disabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=f"rank {rank}", unit="utt", position=position,
                dynamic_ncols=True, mininterval=1.0, disable=disabled)


# --- main ----------------------------------------------------------------------------------
def run(options: ExtractOptions) -> int:
    rank, world, local_rank, local_world = rank_info()
    run_dir = RunDir(options.output_dir)
    started = datetime.now(timezone.utc)
    source = describe_input(options)
    if options.check_only:  # nothing is made: the dir must be writable, or makeable in a writable folder
        from speakerlab.checks import writable_dir_problem
        problem = writable_dir_problem(run_dir.path, "--output_dir")
        if problem:
            raise UsageError(problem)
    else:
        run_dir.ensure_writable()  # before the model loads: a read-only dir fails in a second, not after
    device = pick_device(options.use_gpu, options.gpu, local_rank, local_world)
    num_workers, threads, streams = cpu_plan(options.num_workers, local_world, device, options.streams)
    torch.set_num_threads(threads)
    if options.check_only:
        embedder, model_identity = build_embedder(options, device, streams)
        log.info("arguments OK: input %s, model %s, output dir %s", source["path"], model_identity["name"],
                 run_dir.path.absolute())
        return 0
    resolved = resolve_model(options, device)  # a wrong model choice fails now, before the scan
    scan, run_id, lock = shared_scan(options, source, run_dir, rank, world)
    try:
        early = early_start(options, run_dir, scan, rank, resolved.config, device, (num_workers, threads, streams),
                            local_world)
        try:
            embedder, model_identity = build_embedder(options, device, streams, resolved)
        except BaseException:
            if early is not None:
                early.close()
            raise
        return run_shard(options, run_dir, scan, run_id, embedder, model_identity, device,
                         (rank, world, local_rank, local_world), (num_workers, threads, streams), started, early)
    finally:
        if rank == 0:
            run_dir.release(lock)
        else:
            lock.release()


_kept = []


def keep_until_exit(embedder: Embedder) -> None:
    """Hold the run's embedder after ``run`` returns: the worker ends with ``os._exit`` (cli.extract),
    and releasing a compiled OpenVINO model first cost 0.2 s of a 20-minute-audio run. The next run
    in the same process (tests, the API) releases the previous one."""
    _kept[:] = [embedder]


def engine_of_earlier_run(options: ExtractOptions, run_dir: RunDir, rank: int, embedder: Embedder,
                          device: torch.device, streams: int) -> Embedder:
    """A resumed rank keeps the engine (backend, dtype) its run started with, where the user left
    the choice to ``auto``: auto may measure another one as fastest here (a requeue onto another CPU
    type), and one rank's results must come from one engine. An engine given explicitly, or one this
    machine cannot run, is left to the fingerprint check, which refuses and names the difference."""
    if options.overwrite or (options.dtype != "auto" and options.backend != "auto"):
        return embedder
    previous = (RankStore(run_dir.path, rank).read_metadata() or {}).get("fingerprint") or {}
    backend, dtype = previous.get("backend"), previous.get("dtype")
    if backend is None or dtype is None or (backend, dtype) == (embedder.backend, embedder.dtype):
        return embedder
    if options.dtype not in ("auto", dtype) or options.backend not in ("auto", backend):
        return embedder
    try:
        kept, _ = build_embedder(dataclasses.replace(options, dtype=dtype, backend=backend), device, streams)
    except UsageError as exc:
        log.warning("rank %d started with %s %s, which this machine cannot run (%s)", rank, backend, dtype, exc)
        return embedder
    log.info("rank %d: resuming with the engine it started with (%s %s; auto chose %s %s here)", rank, backend,
             dtype, embedder.backend, embedder.dtype)
    return kept


def run_shard(options: ExtractOptions, run_dir: RunDir, scan, run_id: str, embedder: Embedder, model_identity: dict,
              device: torch.device, ranks, cpu, started: datetime, early: Optional[EarlyStart] = None) -> int:
    """This rank's shard of the scan: resumed, embedded, finalized. ``early``: its decode workers,
    started before the model loaded (``early_start``)."""
    rank, world, local_rank, local_world = ranks
    num_workers, threads, streams = cpu
    shard = scan.utterances  # this rank's contiguous rows of the scan (rundir.load_shard)
    embedder = engine_of_earlier_run(options, run_dir, rank, embedder, device, streams)
    keep_until_exit(embedder)
    # every setting that changes the numbers: a resume with another one is refused
    fingerprint = {"model_sha256": model_identity["sha256"], "model_config": model_identity["config"],
                   "features": embedder.fbank.describe(), "dtype": embedder.dtype, "backend": embedder.backend,
                   "channels": options.channels,
                   "max_chunk_s": options.max_chunk_s, "fused": options.fuse, **scan_fingerprint(scan),
                   "world_size": world, "rank": rank}
    # (a wipe leaves the journal of decode workers started before the model loaded)
    store, previous = open_rank_store(run_dir, rank, fingerprint, options.overwrite,
                                      keep=run_dir.journal_dir(rank).name if early is not None else None)
    if previous is not None:
        missing = run_dir.missing_rank_pickles(rank)
        if missing:  # the embeddings are all there: only the files made from them are rewritten
            log.warning("rank %d was complete, but %s missing: rewriting from %s", rank, ", ".join(missing),
                        run_dir.rank_embeddings_path(rank).name)
            store.rewrite_pickles(shard)
        counts = previous["counts"]
        log.info("rank %d: already complete (%d embedded, %d failed); nothing to do (--overwrite redoes it)",
                 rank, counts["embedded"], counts["failed"])
        if counts["failed"]:
            log.warning("rank %d: %d of %d files failed (see %s)", rank, counts["failed"], counts["assigned"],
                        store.metadata_path)
        return exit_status(counts["embedded"], counts["failed"], options.strict, scan_errors(scan, rank))
    plan = shard_plan(options, embedder.batch_frames(options.batch_frames), device, cpu, local_world)
    metadata = {"rank": rank, "world_size": world, "complete": False, "fingerprint": fingerprint,
                "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "model": model_identity,
                "started": started.isoformat(), "command": sys.argv,
                "device": str(device), "dtype": embedder.dtype, "versions": versions(),
                "batch_policy": {"batch_frames": None, "batch_size": plan.batch_size,
                                 "fused": options.fuse, "length_grid": embedder.grid},
                "engine": embedder.choice}  # backend and dtype, and why (speakerlab/calibration.py)
    store.write_metadata(metadata)
    done = store.load_parts()  # the parts are read once: their keys make the to-do list
    todo = [u for u in shard if u.key not in done]
    if done:
        log.info("rank %d: resuming, %d of %d utterances already done", rank, len(done), len(shard))
    metadata["batch_policy"]["batch_frames"] = plan.batch_frames
    journal = DecodeJournal(run_dir.journal_dir(rank)) if num_workers > 0 else None
    if journal is not None and early is None:
        journal.clear()  # an earlier run's; a fresh one per run (early workers write in theirs already)
    log.info("rank %d/%d on %s (%s): %d utterances to do, %d decode workers, %d model stream(s) x %d "
             "thread(s), batches of <= %d frames", rank, world, device, embedder.dtype, len(todo), num_workers,
             streams, threads, plan.batch_frames)
    metadata["batch_policy"].update({"streams": streams, "threads": threads, "num_workers": num_workers})

    progress = make_progress(len(shard), len(done), rank, local_rank, options.no_progress)
    rate = SteadyRate()
    embed_shard(todo, embedder, store, plan, journal, progress, label=f"rank {rank}", rate=rate,
                notes=metadata["batch_policy"], early=early)
    metadata["timing"] = rate.summary(device)
    if metadata["timing"].get("steady_x_real_time"):
        log.info("rank %d: steady state %.1fx real time (%.0f s of audio in %.1f s after the first batch)", rank,
                 metadata["timing"]["steady_x_real_time"], metadata["timing"]["steady_audio_s"],
                 metadata["timing"]["steady_s"])
    if journal is not None:
        journal.clear()
    progress.close()
    first_row = scan.meta["shard_bounds"][rank] if scan.meta.get("shard_bounds") else 0
    return finish_rank(store, shard, metadata, started, options.strict, scan_errors(scan, rank), first_row)


def finish_rank(store: RankStore, shard, metadata: dict, started: datetime, strict: bool, scan_problems: int,
                first_row: int = 0) -> int:
    """Write the rank's final files, marked complete; the exit status."""
    with signals_held():
        store.flush()
    rank = metadata["rank"]
    finished = datetime.now(timezone.utc)
    metadata.update({
        "complete": True, "finished": finished.isoformat(),
        "elapsed_s": round((finished - started).total_seconds(), 3),
        "embedding_dimension": store.dim,
        "counts": {"assigned": len(shard)},
    })
    written = store.finalize(shard, metadata, first_row)
    embedded, failed = written["embedded"], written["failed"]
    if failed:
        log.warning("rank %d: %d of %d files failed (see %s)", rank, failed, len(shard), store.metadata_path)
    log.info("rank %d: done, %d embedded, %d failed", rank, embedded, failed)
    return exit_status(embedded, failed, strict, scan_problems)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    options = ExtractOptions.from_namespace(build_parser().parse_args(argv))
    run_dir = RunDir(options.output_dir)
    try:
        return run(options)
    except (UsageError, data_mod.DataError, RunDirBusy, HostMemoryError) as exc:
        return fail(run_dir, str(exc), "usage", 2)
    except RunDirError as exc:
        return fail(run_dir, str(exc), "runtime", 1)
    except OSError as exc:  # disk full, read-only filesystem ...: the file and the cause, no traceback
        return fail(run_dir, describe_os_error(exc), "runtime", 1)
    except BaseException as exc:
        tell_waiting_ranks(run_dir, f"{type(exc).__name__}: {exc}", "runtime")
        raise


def fail(run_dir: RunDir, message: str, kind: str, status: int) -> int:
    tell_waiting_ranks(run_dir, message, kind)
    sys.stderr.write(f"error: {message}\n")  # one write: ranks sharing a terminal or pipe do not interleave it
    sys.stderr.flush()
    return status
