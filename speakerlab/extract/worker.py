"""Embed one shard: batches planned by length, decoded by the loader, run through model streams,
results and failures written to a store. Knows nothing of ranks, scans or the command line."""
import functools
import logging
import signal
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch

from speakerlab.batching import plan_batches, split_tail
from speakerlab.embedder import Embedder, Result, release_memory
from speakerlab.hostmem import memory_limit_bytes, plan_in_flight, shm_free_bytes
from speakerlab.extract.loader import (MAX_DECODER_CRASHES, WaveDataset, collate, crashed_files, dead_workers,
                                       death_behind, watch_workers)

log = logging.getLogger("speakerlab")


@dataclass
class ShardPlan:
    """How a shard is run: batch budget, decode workers, model streams, flushing."""
    batch_frames: int
    batch_size: Optional[int]  # None: no count cap (GPU: the frame budget alone)
    num_workers: int
    streams: int
    threads: int
    channels: str = "first"
    flush_every: int = 1000
    flush_seconds: float = 60.0
    pin_memory: bool = False
    processes_on_host: int = 1  # share /dev/shm and memory with this one (ranks on the node)


class ModelStreams:
    """Run ``embedder.embed`` on batches in ``streams`` threads, yielding results in input order.

    Each thread runs its batch's fbank and model single-threaded (``threads`` intra-op threads);
    torch releases the GIL inside ops, so streams use separate cores. Batches of more than
    ``max(batch_frames, 12000)`` frames (files over 2 minutes) run one at a time, so the memory
    peak stays that of one long file.
    """

    def __init__(self, embedder: Embedder, streams: int, threads: int, batch_frames: int,
                 overlap: Optional[bool] = None):
        self.embedder = embedder
        self.streams = max(1, streams)
        self.threads = threads
        self.batch_frames = batch_frames
        self._oversized = threading.Lock()
        # GPU: batch k+1 is queued before batch k's results are waited for and stored, so the GPU
        # never idles while the host writes (CPU streams overlap by running in threads instead)
        self.overlap = (getattr(getattr(embedder, "device", None), "type", None) == "cuda"
                        if overlap is None else overlap)

    def _embed(self, batch):
        frames = (batch.feats.shape[1] if batch.feats is not None
                  else batch.waves.shape[1] // self.embedder.fbank.config.frame_shift)
        if self.streams > 1 and frames > max(self.batch_frames, 12000):
            with self._oversized:
                return embed_batch(self.embedder, batch.waves, batch.lengths, batch.feats)
        return embed_batch(self.embedder, batch.waves, batch.lengths, batch.feats)

    def map(self, loader):
        """Yield (batch, [Result per utterance]) for each loader batch, in loader order."""
        if self.streams == 1 and self.overlap:
            previous = None
            for batch in loader:
                queued = (batch, submit_batch(self.embedder, batch.waves, batch.lengths, batch.feats)
                          if batch.indices else list)
                if previous is not None:
                    yield previous[0], previous[1]()
                previous = queued
            if previous is not None:
                yield previous[0], previous[1]()
            return
        if self.streams == 1:
            for batch in loader:
                yield batch, (self._embed(batch) if batch.indices else [])
            return
        window = deque()
        with ThreadPoolExecutor(self.streams, initializer=torch.set_num_threads,
                                initargs=(self.threads,)) as pool:
            for batch in loader:
                window.append((batch, pool.submit(self._embed, batch) if batch.indices else None))
                while len(window) > 2 * self.streams:  # keep every stream busy, a few queued
                    done, future = window.popleft()
                    yield done, future.result() if future else []
            while window:
                done, future = window.popleft()
                yield done, future.result() if future else []


@dataclass(frozen=True)
class LoaderSpec:
    """What planning and decoding a shard need of the model side: the rate the decoders resample to,
    the fbank they compute (CPU; None: the waves go to the device, whose fbank runs there) and the
    length grid batches are padded to. Made from the embedder, or from the config before the model
    loads (``early_start``); both must agree, ``key`` says."""
    sample_rate: int
    fbank: Optional[object]
    grid: bool
    grid_steps: int

    @classmethod
    def of(cls, embedder: Embedder) -> "LoaderSpec":
        return cls(embedder.fbank.config.sample_rate, embedder.fbank if embedder.device.type == "cpu" else None,
                   embedder.grid, embedder.grid_steps)

    def key(self) -> tuple:
        return (self.sample_rate, self.fbank.describe() if self.fbank is not None else None, self.grid,
                self.grid_steps)


@dataclass
class EarlyStart:
    """Decode workers started before the model loaded, on a fresh rank's whole shard: they decode
    (and on CPU compute the fbank) on the cores the model load and compile leave idle."""
    batches: object  # the started loader's iterator (its workers out of torch's SIGCHLD check: quiet_workers)
    key: tuple       # (LoaderSpec.key(), ShardPlan) it was planned with
    count: int       # utterances planned (the whole shard)
    notes: dict      # what in_flight changed to fit the host

    def matches(self, todo, spec: LoaderSpec, plan: ShardPlan) -> bool:
        return self.count == len(todo) and self.key == (spec.key(), plan)

    def take(self):
        """The loader's iterator, handed over (back in torch's SIGCHLD check); this no longer holds it."""
        batches, self.batches = self.batches, None
        try:
            watch_workers(batches)  # raises now if a worker died while the model loaded
        except BaseException:
            shut_down(batches)  # its other workers too (the journal still names the dead one's file)
            raise
        return batches

    def close(self) -> None:
        """Stop its workers (not taken: the model failed to load, or the plan differs)."""
        batches, self.batches = self.batches, None
        if batches is not None:
            shut_down(batches)


def shut_down(batches) -> None:
    """Stop a loader iterator's decode workers now (not when it is collected)."""
    try:
        batches._shutdown_workers()
    except Exception:  # a worker already dead, a private API changed: collection ends them all the same
        pass


def estimate_samples(todo, sample_rate: int) -> np.ndarray:
    """Each utterance's length at ``sample_rate`` from its header (arrays, not lists of ints: a rank
    plans its whole shard, 36 -> 8 bytes a file each)."""
    return np.fromiter((int(u.num_samples * sample_rate / u.sample_rate) if u.sample_rate else 0 for u in todo),
                       dtype=np.int64, count=len(todo))


def start_batches(todo, left: np.ndarray, est: np.ndarray, plan: ShardPlan, spec: LoaderSpec, journal=None,
                  notes: Optional[dict] = None):
    """Plan ``todo[left]``'s batches and start the decode workers: the loader's iterator."""
    # Longest batches first: the run then ends on short batches, so concurrent model streams finish
    # together instead of one core idling while the other runs the longest file (measured: ~4%).
    batches = [left[batch].tolist() for batch in
               plan_batches(est[left], plan.batch_frames, plan.batch_size, grid=spec.grid,
                            grid_steps=spec.grid_steps)[::-1]]
    if plan.streams > 1:  # and the streams' last batches halved, so they end closer together
        batches = split_tail(batches, 2 * plan.streams)
    # CPU: the decode workers compute the fbank too, off the model streams' cores (GPU: on the GPU)
    fbank = spec.fbank if plan.num_workers > 0 else None
    workers, prefetch = in_flight(batches, est, plan, notes, features=fbank is not None)
    loader = torch.utils.data.DataLoader(
        WaveDataset(todo, spec.sample_rate, plan.channels, journal), batch_sampler=batches, num_workers=workers,
        collate_fn=functools.partial(collate, fbank=fbank if workers > 0 else None), pin_memory=plan.pin_memory,
        prefetch_factor=prefetch if workers > 0 else None)
    return iter(loader)  # decode workers start here


def embed_shard(todo, embedder: Embedder, store, plan: ShardPlan, journal=None, progress=None,
                label: str = "", rate: Optional["SteadyRate"] = None, notes: Optional[dict] = None,
                early: Optional[EarlyStart] = None) -> float:
    """Embed ``todo`` (utterances) into ``store``; every file ends up added or failed. Returns the
    seconds of audio embedded. A decoder that kills its worker fails its file (named by ``journal``)
    and the shard goes on, up to MAX_DECODER_CRASHES times. ``rate`` times the batches; ``notes``
    (a dict) receives what was changed to fit the host (``in_flight``). ``early``: decode workers
    already started on ``todo`` (used when they were planned as this embedder and plan would)."""
    prefix = f"{label}: " if label else ""
    spec = LoaderSpec.of(embedder)
    sr = spec.sample_rate
    est = estimate_samples(todo, sr)
    start_n = progress.n if progress is not None else 0
    audio_seconds = 0.0
    left = np.arange(len(todo))
    if early is not None and not early.matches(todo, spec, plan):
        # (parts without metadata, someone removed it; or a plan the model changed)
        log.info("%sthe decode workers started before the model loaded were planned otherwise: starting "
                 "them again", prefix)
        early.close()
        early = None
    if notes is not None:
        notes["workers_started_early"] = early is not None
        notes.update(early.notes if early is not None else {})
    batches_in = None
    for attempt in range(MAX_DECODER_CRASHES + 1):
        try:
            if attempt == 0 and early is not None:
                taken, early = early, None
                batches_in = taken.take()  # a worker that died while the model loaded is reported here
            else:
                batches_in = start_batches(todo, left, est, plan, spec, journal, notes)
            try:  # the decode workers decode while the engine compiles
                embedder.prepare()
            except Exception as exc:
                # a worker that died meanwhile is reported here (torch's SIGCHLD handler runs in
                # the main thread, wherever it is): a decoder crash, handled below, not the engine's
                if dead_workers(exc) is not None:
                    raise
                raise embedder.engine_failure(exc) from exc
            streams = ModelStreams(embedder, plan.streams, plan.threads, plan.batch_frames)
            for batch, results in streams.map(batches_in):
                with signals_held():
                    for index, error in batch.bad:
                        store.fail(failure_record(todo[index], error.stage, error.reason))
                    for position, index in enumerate(batch.indices):
                        utt = todo[index]
                        result = results[position]
                        if result.error:
                            store.fail(failure_record(utt, *result.error))
                        else:
                            seconds = int(batch.lengths[position]) / sr
                            audio_seconds += seconds
                            store.add(utt.key, result.embedding,
                                      {"seconds": round(seconds, 4)} if result.chunks == 1 else
                                      {"seconds": round(seconds, 4), "chunks": result.chunks})
                    store.maybe_flush(plan.flush_every, plan.flush_seconds)
                if rate is not None:
                    rate.batch_done(audio_seconds)
                if progress is not None:
                    progress.update(len(batch.indices) + len(batch.bad))
                    progress.set_postfix_str(f"{audio_seconds / 3600:.2f} h audio", refresh=False)
            break
        except (RuntimeError, ConnectionError, EOFError) as error:
            # A worker killed while handing over a batch can surface as a broken connection before
            # torch's SIGCHLD handler reports it: ask torch which worker died.
            with signals_held():  # another worker's death must not interrupt this (it is asked below)
                exc = death_behind(error) if not isinstance(error, RuntimeError) else error
                if batches_in is not None:  # its other workers stop now (up to 32 batches ahead)
                    shut_down(batches_in)
                    batches_in = None
            if exc is None:
                raise
            store.repair()  # in case an add was cut short all the same
            handled = store.done_keys()
            left = left[np.fromiter((todo[i].key not in handled for i in left.tolist()), dtype=bool, count=len(left))]
            culprits = crashed_files(exc, journal, set(left.tolist()))
            if not culprits or attempt == MAX_DECODER_CRASHES:
                raise exc
            with signals_held():
                for index, how in culprits:
                    log.warning("%sthe decoder crashed on %s (%s); listed as failed, going on",
                                prefix, todo[index].path, how)
                    store.fail(failure_record(todo[index], "decode", f"the decoder crashed on this file ({how})"))
                store.flush()
            culprit_set = {index for index, _ in culprits}
            left = left[np.fromiter((i not in culprit_set for i in left.tolist()), dtype=bool, count=len(left))]
            if progress is not None:
                progress.n = start_n + len(todo) - len(left)
                progress.refresh()
    return audio_seconds


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


def embed_batch(embedder: Embedder, waves: Optional[torch.Tensor], lengths: torch.Tensor,
                feats: Optional[torch.Tensor] = None) -> List[Result]:
    """embedder.embed, but an exception in the model fails only the utterance that causes it: the
    batch is retried one utterance at a time, and the shard goes on. ``feats``: the batch's fbank
    when the decode worker computed it (``waves`` is then None)."""
    return submit_batch(embedder, waves, lengths, feats, queue=False)()


def submit_batch(embedder: Embedder, waves: Optional[torch.Tensor], lengths: torch.Tensor,
                 feats: Optional[torch.Tensor] = None, queue: bool = True) -> Callable[[], List[Result]]:
    """``embed_batch`` in two steps: queue the batch on the device (``Embedder.submit``) and return a
    function that waits for its results -- so the rank stores one batch while the GPU runs the next."""
    try:
        if queue:
            return embedder.submit(waves, lengths, feats).results
        results = embedder.embed(waves, lengths, feats)
        return lambda: results
    except Exception as exc:
        if dead_workers(exc) is not None:  # a decode worker died (raised from torch's SIGCHLD handler)
            raise
        reason = f"{type(exc).__name__}: {exc}"
    # Retried after the handler: inside it, the exception's traceback would keep the failed batch's
    # tensors alive while its utterances run again.
    release_memory(getattr(embedder, "device", torch.device("cpu")))
    if len(lengths) == 1:
        failed = [Result(error=("model", f"model error: {reason}"))]
        return lambda: failed
    log.warning("a batch of %d failed in the model (%s); retrying one by one", len(lengths), reason)
    if feats is not None:  # each row's features are its own (mean normalised over its own frames)
        frames = embedder.fbank.frame_lengths(lengths).tolist()
        results = [embed_batch(embedder, None, lengths[row:row + 1], feats[row:row + 1, :max(frames[row], 0)])[0]
                   for row in range(len(lengths))]
    else:
        results = [embed_batch(embedder, waves[row:row + 1, :int(lengths[row])], lengths[row:row + 1])[0]
                   for row in range(len(lengths))]
    return lambda: results


# Batches of features a CPU decode worker may hold ready (up to this many bytes counted as decoded
# samples, features being about half that): deep enough that the worker, started before the model
# loads, decodes through the start-up while one core is idle (CAM++, 21 min of audio: 7.88 -> 7.57 s
# whole process with 32 batches instead of 4, medians of 5 runs).
CPU_PREFETCH_BYTES = 128 << 20
CPU_PREFETCH_MAX = 32


def in_flight(batches, est, plan: ShardPlan, notes: Optional[dict] = None, features: bool = False):
    """(decode workers, batches prefetched per worker) that /dev/shm and pinned memory can hold
    (hostmem.plan_in_flight; HostMemoryError when a single batch does not fit this process's share).
    ``features``: the workers hand over fbank features (CPU), small enough to keep many ready."""
    largest = int(max((len(b) * max(int(est[i]) for i in b) for b in batches if b), default=0)) * 4  # float32 samples
    prefetch = 4
    shm_free = shm_free_bytes()
    if features:  # deeper where it fits: within the budget, and within what plan_in_flight allows /dev/shm
        room = CPU_PREFETCH_BYTES if shm_free is None else min(
            CPU_PREFETCH_BYTES, shm_free // max(1, plan.processes_on_host) // 2)
        prefetch = max(prefetch, min(CPU_PREFETCH_MAX, room // max(1, largest * max(1, plan.num_workers))))
    workers, prefetch, note = plan_in_flight(largest, plan.num_workers, prefetch, plan.processes_on_host,
                                             shm_free, pinned=plan.pin_memory,
                                             memory_limit=memory_limit_bytes() if plan.pin_memory else None)
    if note:
        log.warning("host memory: %s", note)
        if notes is not None:
            notes["in_flight"] = note
    return workers, prefetch


class SteadyRate:
    """x real time after the first batch: start-up (imports, scan, model load, decode workers starting,
    the first batch's cuDNN/oneDNN set-up) excluded -- what a long run sustains."""

    def __init__(self):
        self.first = None  # (time, audio seconds) when the first batch was stored
        self.last = None

    def batch_done(self, audio_seconds: float) -> None:
        point = (time.time(), audio_seconds)
        if self.first is None:
            self.first = point
        self.last = point

    def summary(self, device: torch.device) -> dict:
        out = {}
        if self.first is not None and self.last[0] > self.first[0]:
            seconds, audio = self.last[0] - self.first[0], self.last[1] - self.first[1]
            out.update({"steady_start_unix": round(self.first[0], 3), "steady_end_unix": round(self.last[0], 3),
                        "steady_s": round(seconds, 3), "steady_audio_s": round(audio, 2),
                        "steady_x_real_time": round(audio / seconds, 1)})
        if device.type == "cuda":
            out["gpu_max_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20)
            out["gpu_max_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / 2 ** 20)
        return out


def failure_record(utt, stage: str, reason: str) -> dict:
    return {"key": utt.key, "path": utt.path, "stage": stage, "reason": reason}

