"""Embed one shard: batches planned by length, decoded by the loader, run through model streams,
results and failures written to a store. Knows nothing of ranks, scans or the command line."""
import logging
import signal
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import List

import torch

from speakerlab.batching import plan_batches
from speakerlab.embedder import Embedder, Result
from speakerlab.extract.loader import MAX_DECODER_CRASHES, WaveDataset, collate, crashed_files, dead_workers

log = logging.getLogger("speakerlab")


@dataclass
class ShardPlan:
    """How a shard is run: batch budget, decode workers, model streams, flushing."""
    batch_frames: int
    batch_size: int
    num_workers: int
    streams: int
    threads: int
    channels: str = "first"
    flush_every: int = 1000
    flush_seconds: float = 60.0
    pin_memory: bool = False


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


def embed_shard(todo, embedder: Embedder, store, plan: ShardPlan, journal=None, progress=None,
                label: str = "") -> float:
    """Embed ``todo`` (utterances) into ``store``; every file ends up added or failed. Returns the
    seconds of audio embedded. A decoder that kills its worker fails its file (named by ``journal``)
    and the shard goes on, up to MAX_DECODER_CRASHES times."""
    prefix = f"{label}: " if label else ""
    sr = embedder.fbank.config.sample_rate
    est = [int(u.num_samples * sr / u.sample_rate) if u.sample_rate else 0 for u in todo]
    start_n = progress.n if progress is not None else 0
    audio_seconds = 0.0
    left = list(range(len(todo)))
    for attempt in range(MAX_DECODER_CRASHES + 1):
        # Longest batches first: the run then ends on short batches, so concurrent model streams finish
        # together instead of one core idling while the other runs the longest file (measured: ~4%).
        batches = [[left[i] for i in batch] for batch in
                   plan_batches([est[i] for i in left], plan.batch_frames, plan.batch_size, grid=embedder.grid)[::-1]]
        loader = torch.utils.data.DataLoader(
            WaveDataset(todo, sr, plan.channels, journal), batch_sampler=batches, num_workers=plan.num_workers,
            collate_fn=collate, pin_memory=plan.pin_memory,
            prefetch_factor=4 if plan.num_workers > 0 else None)
        try:
            streams = ModelStreams(embedder, plan.streams, plan.threads, plan.batch_frames)
            for batch, results in streams.map(loader):
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
                if progress is not None:
                    progress.update(len(batch.indices) + len(batch.bad))
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
                    log.warning("%sthe decoder crashed on %s (%s); listed as failed, going on",
                                prefix, todo[index].path, how)
                    store.fail(failure_record(todo[index], "decode", f"the decoder crashed on this file ({how})"))
                store.flush()
            culprit_set = {index for index, _ in culprits}
            left = [i for i in left if i not in culprit_set]
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


def embed_batch(embedder: Embedder, waves: torch.Tensor, lengths: torch.Tensor) -> List[Result]:
    """embedder.embed, but an exception in the model fails only the utterance that causes it: the
    batch is retried one utterance at a time, and the shard goes on."""
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

