"""The memory-mapped npy set answers like the in-memory EmbeddingSet."""
import json

import numpy as np
import pytest

from speakerlab import data as data_mod
from speakerlab import mapped, scanfile, streammerge
from speakerlab.api import EmbeddingSet
from tests.test_streammerge import NAMES, split_ranks, synthetic_run

FILES = {"matrix": "utterance_embeddings.npy", "index": "utterance_index.npy", "jsonl": "utterance_list.jsonl",
         "speaker_matrix": "speaker_embeddings.npy", "speaker_jsonl": "speaker_list.jsonl"}


@pytest.fixture(scope="module")
def npy_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mapped")
    scan, keys, matrix, failures, extra = synthetic_run(seed=11, count=400)
    scanfile.save(scan, tmp / "scan.npz")
    row_of = {u.key: i for i, u in enumerate(scan.utterances)}
    ranks = [streammerge.results_from_arrays(*part, row_of) for part in split_ranks(keys, matrix, failures, extra, 2, 3)]
    out = tmp / "final"
    out.mkdir()
    with scanfile.ScanFile(tmp / "scan.npz") as handle:
        streammerge.stream_merge([handle], [ranks], out, out, ["npy"], NAMES)
    return out


def same(got, want):
    """Matches equal: same keys in the same order, cosines to float32 rounding (blockwise products)."""
    return [m.key for m in got] == [m.key for m in want] and \
        np.allclose([m.score for m in got], [m.score for m in want], rtol=0, atol=1e-6)


def reference(directory):
    """The same dir as an in-memory EmbeddingSet."""
    records = [json.loads(line) for line in (directory / "utterance_list.jsonl").read_text().splitlines()]
    speakers = [json.loads(line) for line in (directory / "speaker_list.jsonl").read_text().splitlines()]
    return EmbeddingSet([r["key"] for r in records], np.load(directory / "utterance_embeddings.npy"), records,
                        [s["key"] for s in speakers], np.load(directory / "speaker_embeddings.npy"), speakers)


@pytest.mark.parametrize("block,threads", [(7, 1), (7, 3), (1 << 16, 2)])
def test_mapped_set_answers_like_the_in_memory_set(npy_dir, block, threads, monkeypatch):
    monkeypatch.setattr(mapped, "BLOCK_ROWS", block)
    monkeypatch.setattr(mapped, "SIMILAR_THREADS", threads)
    emb = mapped.MappedEmbeddingSet(npy_dir, FILES)
    ref = reference(npy_dir)
    assert len(emb) == len(ref) and emb.dim == ref.dim
    assert list(emb.keys) == ref.keys and emb.speaker_keys == ref.speaker_keys and emb.datasets == ref.datasets
    some = ref.keys[::37]
    for key in some:
        assert key in emb and emb.speaker_of(key) == ref.speaker_of(key)
        got, want = emb.utterances[key], ref.utterances[key]
        assert np.array_equal(got.pop("embedding"), want.pop("embedding")) and got == want
        for which in (None, True, False):
            assert same(emb.similar(key, k=5, same_speaker=which), ref.similar(key, k=5, same_speaker=which))
    assert "nope" not in emb and ref.keys[0][:-1] + "~" not in emb
    vector = np.random.default_rng(0).standard_normal(emb.dim).astype(np.float32)
    assert same(emb.similar(vector, k=9), ref.similar(vector, k=9))
    assert same(emb.similar_speakers(some[1], k=4), ref.similar_speakers(some[1], k=4))
    assert emb.score(some[0], some[1]) == ref.score(some[0], some[1])
    sub, want = emb.by_dataset("vox"), ref.by_dataset("vox")
    assert list(sub.keys) == want.keys and sub.speaker_keys == want.speaker_keys
    assert same(sub.similar(want.keys[3], k=6), want.similar(want.keys[3], k=6))
    assert np.array_equal(sub.matrix()[1], want.matrix()[1])
    spk = ref.speaker_keys[4]
    one, want = emb.by_dataset("vox", "libri").by_speaker(spk), ref.by_speaker(spk)
    assert list(one.keys) == want.keys and list(one.speakers) == [spk]
    assert same(one.similar(want.keys[0], k=3, same_speaker=True), want.similar(want.keys[0], k=3, same_speaker=True))
    assert want.keys[0] in one and all(k in want.keys or k not in one for k in ref.keys[:20])
    with pytest.raises(KeyError, match="no dataset"):
        emb.by_dataset("timit")
    with pytest.raises(KeyError, match="no speaker"):
        emb.by_speaker(spk + "_nobody")
    keys, matrix = emb.matrix()
    assert isinstance(matrix, np.ndarray) and not matrix.flags.writeable
    assert np.array_equal(matrix, ref.matrix()[1])
    emb.close()


@pytest.mark.parametrize("count,parts", [(0, 2), (1, 2), (7, 2), (8, 3), (50, 4), (100, 1), (29, 9)])
def test_similar_ranges_cover_every_row_once(count, parts, monkeypatch):
    monkeypatch.setattr(mapped, "BLOCK_ROWS", 4)
    ranges = mapped._split(count, parts)
    assert len(ranges) <= max(1, parts)
    covered = [r for a, b in ranges for r in range(a, b)]
    assert covered == list(range(count))
    assert all(a % 4 == 0 for a, _ in ranges)
