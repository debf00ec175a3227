"""The extraction worker's GPU behaviour, on CPU (issue 15): batch k stored while batch k+1 runs, model
errors retried after their handler, GPU mapping and host memory errors as one line (exit 2), and
what --batch_size means on GPU."""
import json

import numpy as np
import pytest
import torch

from speakerlab.batching import pad_waves
from speakerlab.config import load_config
from speakerlab.embedder import Embedder
from speakerlab.extract.main import batch_size_cap
from speakerlab.extract.loader import Batch
from speakerlab.extract.worker import ModelStreams, SteadyRate, embed_batch
from speakerlab.models import load_model
from tests.helpers import extract_cmd, micro_model, tone, write_wav
from tests.test_gpu_ready import FakeAllocator


@pytest.fixture(scope="module")
def tiny_embedder(fixtures_dir):
    config = load_config(fixtures_dir / "campplus_tiny" / "config.yaml")
    return Embedder(load_model(config, fixtures_dir / "campplus_tiny" / "model.ckpt"), config,
                    torch.device("cpu"), dtype="fp32")


WAVES = [tone(0.6 + 0.3 * i, seed=i, freq=140 + 20 * i) for i in range(8)]


def loader_batches(events=None):
    for i in range(0, 8, 2):
        if events is not None:
            events.append(f"load {i // 2}")
        batch, lengths = pad_waves(WAVES[i:i + 2])
        yield Batch([i, i + 1], batch, lengths, [])


def test_next_batch_is_queued_before_the_previous_is_stored(tiny_embedder):
    events = []

    class Spy:
        """The real embedder, with its submit and result waits recorded."""
        device = torch.device("cuda")  # what turns the overlap on by default
        fbank = tiny_embedder.fbank

        def submit(self, waves, lengths, feats=None):
            number = sum(e.startswith("submit") for e in events)
            events.append(f"submit {number}")
            pending = tiny_embedder.submit(waves, lengths, feats)

            def results():
                events.append(f"wait {number}")
                return pending.results()
            return type("P", (), {"results": staticmethod(results)})

    streams = ModelStreams(Spy(), 1, 1, 3000)
    assert streams.overlap
    got = []
    for number, (batch, results) in enumerate(streams.map(loader_batches(events))):
        events.append(f"store {number}")
        got.extend(results)
    # batch k+1 is loaded and queued before batch k is waited for and stored
    assert events[:6] == ["load 0", "submit 0", "load 1", "submit 1", "wait 0", "store 0"]
    assert events[-2:] == ["wait 3", "store 3"]
    plain = [r for _, rs in ModelStreams(tiny_embedder, 1, 1, 3000, overlap=False).map(loader_batches()) for r in rs]
    for a, b in zip(got, plain):
        np.testing.assert_allclose(a.embedding, b.embedding, rtol=1e-6, atol=1e-7)


def test_model_error_retried_after_its_handler(tiny_embedder):
    """A batch that fails in the model is retried one by one with the failed batch's memory released
    (inside the except block its traceback would still hold it)."""
    allocator = FakeAllocator(capacity=10 ** 9)
    seen = []
    forward = tiny_embedder.model.forward

    def fragile(x, lengths=None):
        seen.append((x.shape[0], allocator.in_use))
        held = allocator.take(x.shape[0] * 1000)  # noqa: F841 -- an activation of this call
        if x.shape[0] > 1:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")
        return forward(x, lengths)

    tiny_embedder.model.forward = fragile
    try:
        batch, lengths = pad_waves(WAVES[:3])
        results = embed_batch(tiny_embedder, batch, lengths)
    finally:
        tiny_embedder.model.forward = forward
    assert seen == [(3, 0), (1, 0), (1, 0), (1, 0)]
    assert all(r.embedding is not None for r in results)


def test_batch_size_on_gpu_is_the_frame_budget_alone(caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert batch_size_cap(None, cpu) == 128 and batch_size_cap(32, cpu) == 32
    assert batch_size_cap(None, cuda) is None
    with caplog.at_level("INFO", logger="speakerlab"):
        assert batch_size_cap(32, cuda) is None  # the seed's --batch_size 32
    assert "--batch_size 32 ignored on GPU" in caplog.text


def test_steady_rate_leaves_out_the_first_batch(monkeypatch):
    clock = iter([100.0, 130.0, 140.0, 150.0])
    monkeypatch.setattr("speakerlab.extract.worker.time.time", lambda: next(clock))
    rate = SteadyRate()
    for audio in (60.0, 1060.0, 2060.0, 3060.0):  # 60 s of audio in the first batch: start-up
        rate.batch_done(audio)
    summary = rate.summary(torch.device("cpu"))
    assert summary["steady_x_real_time"] == 3000.0 / 50.0 and summary["steady_audio_s"] == 3000.0


def _clean_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)


def test_gpu_mapping_error_is_one_line(tmp_path, capsys, monkeypatch):
    """Two ranks on a node with one GPU and no --gpu: one clear line, exit 2 (was: both on GPU 0)."""
    from speakerlab.extract import main
    _clean_env(monkeypatch)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail("no device may be set"))
    write_wav(tmp_path / "data" / "ds" / "spk" / "u.wav", tone(0.5))
    argv = [str(a) for a in extract_cmd(tmp_path / "data", tmp_path / "out", *micro_model(tmp_path / "m"),
                                        "--use_gpu")[2:]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: 2 ranks on this node but 1 GPU(s) visible: start at most 1 rank(s) per node, or share "
                   "GPUs deliberately with one --gpu id per rank (e.g. --gpu 0 0)"]


def test_too_small_shm_is_one_line(tmp_path, capsys, monkeypatch):
    from speakerlab.extract import main
    from speakerlab.extract import worker
    _clean_env(monkeypatch)
    monkeypatch.setattr(worker, "shm_free_bytes", lambda: 50_000)  # one 1 s batch is 64 kB
    for i in range(3):
        write_wav(tmp_path / "data" / "ds" / "spk" / f"u{i}.wav", tone(1.0, seed=i))
    argv = [str(a) for a in extract_cmd(tmp_path / "data", tmp_path / "out", *micro_model(tmp_path / "m"),
                                        "--num_workers", "1")[2:]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: /dev/shm too small: 0 MB for 1 rank(s)")
    assert "--num_workers 0" in err[0]
    assert main(argv[:-2] + ["--num_workers", "0"]) == 0  # decoding in the rank needs no /dev/shm
    meta = json.loads((tmp_path / "out" / "rank_00" / "metadata.json").read_text())
    assert meta["counts"]["embedded"] == 3
