"""Batch planning and the length grid: padded lengths repeat, padding stays invisible."""
import numpy as np
import torch

from speakerlab.batching import grid_frames, pad_waves, plan_batches, split_tail
from speakerlab.config import load_config
from speakerlab.embedder import Embedder
from speakerlab.models import load_model


def test_grid_lengths():
    values = [grid_frames(n) for n in range(1, 50001)]
    assert values[:16] == list(range(1, 17))  # exact up to 16 frames
    assert all(b >= a for a, b in zip(values, values[1:]))  # monotone
    assert all(v >= n and (v - n) / n <= 1 / 16 for n, v in enumerate(values, start=1))
    assert len(set(values[199:2000])) <= 60  # 2-20 s: a few dozen lengths, not 1800
    assert grid_frames(grid_frames(1234)) == grid_frames(1234)


def test_plan_with_grid_keeps_the_budget_on_padded_lengths():
    rng = np.random.default_rng(0)
    samples = [int(s) for s in rng.integers(3_000, 400_000, size=300)]
    for grid in (False, True):
        batches = plan_batches(samples, 6000, 64, grid=grid)
        assert sorted(i for b in batches for i in b) == list(range(300))
        for batch in batches:
            longest = max(samples[i] // 160 for i in batch)
            padded = grid_frames(longest) if grid else longest
            assert len(batch) == 1 or len(batch) * padded <= 6000
            assert len(batch) <= 64


def test_grid_padding_does_not_change_embeddings(fixtures_dir):
    """Batches padded up to grid lengths give the embeddings of unpadded batches (fp32), every family."""
    rng = np.random.default_rng(3)
    waves = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (4_100, 9_650, 16_000, 23_333)]
    for name in ("campplus_tiny", "eres2net_tiny", "eres2netv2_tiny"):
        config = load_config(fixtures_dir / name / "config.yaml")
        got = {}
        for grid in (False, True):
            embedder = Embedder(load_model(config, fixtures_dir / name / "model.ckpt"), config,
                                torch.device("cpu"), dtype="fp32", grid=grid)
            batch, lengths = pad_waves(waves)
            got[grid] = np.stack([r.embedding for r in embedder.embed(batch, lengths)])
            alone = np.stack([embedder.embed(*pad_waves([w]))[0].embedding for w in waves])
            cos = (got[grid] * alone).sum(1) / np.linalg.norm(got[grid], axis=1) / np.linalg.norm(alone, axis=1)
            assert cos.min() > 0.99999, (name, grid)
        assert np.abs(got[True] - got[False]).max() <= 2e-5 * np.abs(got[False]).max(), name


def test_split_tail_halves_the_last_batches_and_keeps_every_index_once():
    rng = np.random.default_rng(3)
    lengths = rng.integers(16000, 16000 * 30, size=200)
    batches = plan_batches(lengths, 6000, 128)[::-1]
    split = split_tail(batches, 4)
    assert all(len(b) > 1 for b in batches[-4:]) and len(split) == len(batches) + 4
    assert split[:-8] == batches[:-4]  # the head is untouched
    assert sorted(i for b in split for i in b) == list(range(200))
    for whole, (a, b) in zip(batches[-4:], zip(split[-8::2], split[-7::2])):
        assert a + b == whole and abs(len(a) - len(b)) <= 1
    assert split_tail([[7], [1, 2, 3]], 2) == [[7], [1, 2], [3]]  # a batch of one stays whole
    assert split_tail(batches, 0) == batches
