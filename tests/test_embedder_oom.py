"""Out-of-memory handling, simulated on CPU: the batch is halved and retried, results unchanged."""
import logging

import numpy as np
import pytest
import torch

from speakerlab.config import load_config
from speakerlab.embedder import Embedder
from speakerlab.models import load_model
from tests.helpers import tone


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    config = load_config(fixtures_dir / "campplus_tiny" / "config.yaml")
    return config, fixtures_dir / "campplus_tiny" / "model.ckpt"


def make_embedder(tiny, max_chunk_frames=30000):
    config, checkpoint = tiny
    return Embedder(load_model(config, checkpoint), config, torch.device("cpu"), dtype="fp32",
                    max_chunk_frames=max_chunk_frames)


def fail_above(embedder, max_batch, calls):
    """Make the model raise torch.OutOfMemoryError for batches larger than ``max_batch``."""
    forward = embedder.model.forward

    def limited(x, lengths=None):
        calls.append(x.shape[0])
        if x.shape[0] > max_batch:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.numel() * 4} bytes")
        return forward(x, lengths)

    embedder.model.forward = limited


WAVES = [tone(s, seed=i, freq=150 + 30 * i) for i, s in enumerate([0.9, 1.4, 2.0, 1.1, 0.7, 1.8, 1.25])]


def test_oom_halves_the_batch_and_results_equal(tiny, caplog):
    expected = make_embedder(tiny).embed_waves(WAVES)
    embedder = make_embedder(tiny)
    calls = []
    fail_above(embedder, 2, calls)
    with caplog.at_level(logging.WARNING, logger="speakerlab"):
        results = embedder.embed_waves(WAVES)
    assert calls == [7, 3, 1, 2, 4, 2, 2]  # 7 -> 3 + 4, 3 -> 1 + 2, 4 -> 2 + 2
    warnings = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(warnings) == 3 and "out of memory at batch 7" in warnings[0]
    for got, want in zip(results, expected):
        assert got.error is None and want.error is None
        np.testing.assert_allclose(got.embedding, want.embedding, rtol=1e-4, atol=1e-5)


def test_oom_at_batch_one_fails_only_that_file(tiny, caplog):
    embedder = make_embedder(tiny)
    forward = embedder.model.forward

    def picky(x, lengths=None):
        if x.shape[0] > 1 or x.shape[1] > 150:  # the 2.0 s file (~198 frames) never fits
            raise torch.OutOfMemoryError("CUDA out of memory")
        return forward(x, lengths)

    embedder.model.forward = picky
    with caplog.at_level(logging.WARNING, logger="speakerlab"):
        results = embedder.embed_waves(WAVES)
    expected = make_embedder(tiny).embed_waves(WAVES)
    for wave, got, want in zip(WAVES, results, expected):
        if len(wave) > 1.5 * 16000:
            assert got.embedding is None and got.error[0] == "model" and "out of memory" in got.error[1]
        else:
            assert got.error is None
            np.testing.assert_allclose(got.embedding, want.embedding, rtol=1e-4, atol=1e-5)
    assert any("single utterance" in r.getMessage() for r in caplog.records)


def test_other_runtime_errors_are_not_swallowed(tiny):
    embedder = make_embedder(tiny)

    def broken(x, lengths=None):
        raise RuntimeError("shape mismatch in conv")

    embedder.model.forward = broken
    with pytest.raises(RuntimeError, match="shape mismatch"):
        embedder.embed_waves(WAVES[:2])


def test_oom_on_a_long_file_chunk_fails_only_that_file(tiny):
    """Chunks of a long file run one at a time; an OOM there fails only that file, clearly."""
    embedder = make_embedder(tiny, max_chunk_frames=60)
    forward = embedder.model.forward

    def no_long(x, lengths=None):
        if x.shape[1] > 40:  # every 49-frame chunk fails
            raise torch.OutOfMemoryError("CUDA out of memory")
        return forward(x, lengths)

    embedder.model.forward = no_long
    result = embedder.embed_waves([tone(1.5, seed=9)])[0]
    assert result.embedding is None and result.error == ("model", "out of memory even for one chunk")
