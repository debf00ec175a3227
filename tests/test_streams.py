"""CPU model streams: batches run concurrently, results come back in loader order."""
import threading
import time

import numpy as np
import pytest
import torch

from speakerlab.config import load_config
from speakerlab.embedder import Embedder
from speakerlab.embedder import default_batch_frames
from speakerlab.extract import ModelStreams, cpu_plan
from speakerlab.extract.loader import Batch, collate
from speakerlab.features import Fbank
from speakerlab.batching import pad_waves
from speakerlab.models import load_model
from tests.helpers import tone


class FakeFbankConfig:
    frame_shift = 160


class FakeEmbedder:
    """Records concurrency; 'embeds' a batch as its row lengths after a delay."""

    def __init__(self, fail_on=None):
        self.fbank = type("F", (), {"config": FakeFbankConfig()})()
        self.active = 0
        self.peak = 0
        self.long_active = 0
        self.long_peak = 0
        self.lock = threading.Lock()
        self.fail_on = fail_on

    def embed(self, waves, lengths, feats=None):
        long = waves.shape[1] > 12000 * 160
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.long_active += long
            self.long_peak = max(self.long_peak, self.long_active)
        time.sleep(0.02 if len(lengths) % 2 else 0.005)  # uneven durations shuffle completion order
        with self.lock:
            self.active -= 1
            self.long_active -= long
        if self.fail_on is not None and int(lengths[0]) == self.fail_on:
            raise RuntimeError("boom")
        return [int(n) for n in lengths]


def fake_batches(count, long_every=None):
    for i in range(count):
        rows = 1 + i % 3
        n = 1000 + i
        if long_every and i % long_every == 0:
            n = 12001 * 160
        yield Batch([i] * rows, torch.zeros(rows, n), torch.full((rows,), n), [])


@pytest.mark.parametrize("streams", [1, 2, 4])
def test_results_in_loader_order(streams):
    fake = FakeEmbedder()
    out = list(ModelStreams(fake, streams, 1, 3000).map(fake_batches(25)))
    assert [batch[0][0] for batch, _ in out] == list(range(25))
    for (indices, _, lengths, _, _), results in out:
        assert results == [int(n) for n in lengths]
    assert fake.peak <= streams and (streams == 1 or fake.peak > 1)


def test_model_error_fails_only_its_batch():
    fake = FakeEmbedder(fail_on=1003)
    out = list(ModelStreams(fake, 2, 1, 3000).map(fake_batches(8)))
    failed = [(b[0][0], r) for b, r in out if not isinstance(r[0], int)]
    assert [index for index, _ in failed] == [3]
    assert failed[0][1][0].error[0] == "model" and "boom" in failed[0][1][0].error[1]


def test_long_batches_run_one_at_a_time():
    fake = FakeEmbedder()
    list(ModelStreams(fake, 4, 1, 3000).map(fake_batches(12, long_every=2)))
    assert fake.long_peak == 1 and fake.peak > 1


def test_empty_batches_pass_through():
    def batches():
        yield Batch([], torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), [(0, "bad")])
        yield Batch([1], torch.zeros(1, 500), torch.tensor([500]), [])
    out = list(ModelStreams(FakeEmbedder(), 2, 1, 3000).map(batches()))
    assert out[0][1] == [] and out[1][1] == [500]


def test_cpu_plan():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    workers, threads, streams = cpu_plan(-1, 1, cpu)
    assert workers >= 1 and threads >= 1 and 1 <= streams <= 16
    assert cpu_plan(3, 1, cpu, 1)[0] == 3 and cpu_plan(3, 1, cpu, 1)[2] == 1
    assert cpu_plan(-1, 1, cuda)[2] == 1


def test_default_batch_frames(fixtures_dir):
    cpu = torch.device("cpu")
    eres = load_model(load_config(fixtures_dir / "eres2netv2_tiny" / "config.yaml"),
                      fixtures_dir / "eres2netv2_tiny" / "model.ckpt")
    cam = load_model(load_config(fixtures_dir / "campplus_tiny" / "config.yaml"),
                     fixtures_dir / "campplus_tiny" / "model.ckpt")
    assert default_batch_frames(cpu, eres) == 1 and default_batch_frames(cpu, cam) == 6000
    assert default_batch_frames(torch.device("cuda"), cam) == 120000


def test_real_model_streams_equal_one_stream(fixtures_dir):
    """Two single-threaded streams of the tiny CAM++ give the same numbers as one stream."""
    config = load_config(fixtures_dir / "campplus_tiny" / "config.yaml")
    embedder = Embedder(load_model(config, fixtures_dir / "campplus_tiny" / "model.ckpt"), config,
                        torch.device("cpu"), dtype="fp32")
    waves = [tone(0.6 + 0.3 * i, seed=i, freq=140 + 20 * i) for i in range(8)]

    def batches():
        for i in range(0, 8, 2):
            batch, lengths = pad_waves(waves[i:i + 2])
            yield Batch([i, i + 1], batch, lengths, [])

    one = [r for _, rs in ModelStreams(embedder, 1, 1, 3000).map(batches()) for r in rs]
    two = [r for _, rs in ModelStreams(embedder, 2, 1, 3000).map(batches()) for r in rs]
    for a, b in zip(one, two):
        np.testing.assert_allclose(a.embedding, b.embedding, rtol=1e-5, atol=1e-6)


def test_features_from_the_decode_worker_equal_the_model_side_fbank(fixtures_dir):
    """CPU runs compute the fbank in the decode worker (collate with an fbank): the batch then carries
    features, not waves, and the embeddings are those of the fbank computed beside the model --
    also when a batch fails and is retried one utterance at a time (each row's features sliced)."""
    config = load_config(fixtures_dir / "campplus_tiny" / "config.yaml")
    embedder = Embedder(load_model(config, fixtures_dir / "campplus_tiny" / "model.ckpt"), config,
                        torch.device("cpu"), dtype="fp32")
    waves = [tone(0.4 + 0.35 * i, seed=i, freq=150 + 15 * i) for i in range(6)]
    items = list(enumerate(waves))
    plain = collate(items)
    with_feats = collate(items, fbank=Fbank(embedder.fbank.config))
    assert plain.feats is None and with_feats.waves is None
    assert with_feats.feats.shape[1] == embedder.fbank.frame_lengths(plain.lengths).max()
    want = embedder.embed(plain.waves, plain.lengths)
    got = [r for _, rs in ModelStreams(embedder, 2, 1, 3000).map([with_feats]) for r in rs]
    for a, b in zip(want, got):
        np.testing.assert_allclose(a.embedding, b.embedding, rtol=1e-5, atol=1e-6)
    from speakerlab.extract.worker import embed_batch
    original = embedder._forward_splitting
    calls = []

    def fail_once(feats, frames, dtype=None):  # the batch fails: every row is retried alone
        calls.append(feats.shape)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return original(feats, frames, dtype)

    embedder._forward_splitting = fail_once
    retried = embed_batch(embedder, None, with_feats.lengths, with_feats.feats)
    assert [tuple(c) for c in calls[1:]] == [(1, int(n), 80) for n in embedder.fbank.frame_lengths(plain.lengths)]
    for a, b in zip(want, retried):
        np.testing.assert_allclose(a.embedding, b.embedding, rtol=1e-5, atol=1e-6)


def test_an_fbank_that_fails_in_the_worker_hands_on_the_waves():
    class Broken(torch.nn.Module):
        def forward(self, waves, lengths):
            raise MemoryError("no room")
    batch = collate([(0, tone(0.5)), (1, tone(0.7))], fbank=Broken())
    assert batch.feats is None and batch.waves.shape == (2, int(0.7 * 16000))


def test_cpu_decode_workers_keep_many_feature_batches_ready(monkeypatch):
    """Handing over features (CPU), a decode worker may run far ahead -- it decodes through the
    model's start-up on an idle core -- as far as 128 MiB of batches; waves (GPU) keep 4 in flight."""
    from speakerlab.extract import worker
    monkeypatch.setattr(worker, "shm_free_bytes", lambda: 64 * 10 ** 9)
    plan = worker.ShardPlan(batch_frames=6000, batch_size=128, num_workers=1, streams=2, threads=1)
    minute = np.full(8, 16000 * 60)  # a batch of one minute each: 3.84 MB of samples
    batches = [[i] for i in range(8)]
    assert worker.in_flight(batches, minute, plan) == (1, 4)
    assert worker.in_flight(batches, minute, plan, features=True) == (1, 32)
    hour = np.full(8, 16000 * 3600)  # hour-long files: no deeper than before
    assert worker.in_flight(batches, hour, plan, features=True) == (1, 4)
    monkeypatch.setattr(worker, "shm_free_bytes", lambda: 100 * 2 ** 20)  # a small /dev/shm still caps it
    workers, prefetch = worker.in_flight(batches, minute, plan, features=True)
    assert workers == 1 and prefetch * 16000 * 60 * 4 <= 50 * 2 ** 20
