"""A rank's results written from its parts a block at a time, in scan-row order, and read back mapped."""
import json
import pickle

import numpy as np

from speakerlab import rankout
from speakerlab.data import Utterance
from speakerlab.npyfile import MappedNpy


def make_parts(tmp_path, count=500, dim=8, per_part=37, seed=0):
    rng = np.random.default_rng(seed)
    utts = [Utterance(key=f"d_s{i // 9:03d}_u{i:04d}", dataset="d", speaker=f"s{i // 9:03d}", utterance=f"u{i:04d}",
                      path=f"/x/{i}.wav") for i in range(count)]
    order = rng.permutation(count)  # processing order: by length, not by key
    matrix = rng.standard_normal((count, dim)).astype(np.float32)
    parts, failures = [], []
    for number, first in enumerate(range(0, count, per_part)):
        chosen = [i for i in order[first:first + per_part] if i % 23]
        failed = [i for i in order[first:first + per_part] if not i % 23]
        extra = {utts[i].key: {"seconds": float(i) / 10, **({"chunks": 3} if i % 50 == 1 else {})} for i in chosen}
        path = tmp_path / f"part_{number:06d}.npz"
        np.savez(path, keys=np.array([utts[i].key for i in chosen], dtype=str), embeddings=matrix[chosen],
                 failures=np.array(json.dumps([{"key": utts[i].key, "reason": "x"} for i in failed])),
                 extra=np.array(json.dumps(extra)))
        parts.append(path)
        failures += failed
    return utts, matrix, parts, failures


def test_rank_npz_from_parts_in_scan_order(tmp_path):
    utts, matrix, parts, failed = make_parts(tmp_path)
    # a redone part (a rerun) repeats keys: they count once
    repeat = tmp_path / "part_000099.npz"
    repeat.write_bytes(parts[2].read_bytes())
    out = tmp_path / "embeddings.npz"
    counts = rankout.write_rank_npz(parts + [repeat], rankout.ShardIndex(utts), out)
    embedded = [i for i in range(len(utts)) if i % 23]
    assert counts["embedded"] == len(embedded) and counts["failed"] == len(failed) + len(
        json.loads(str(np.load(parts[2])["failures"])))
    with np.load(out, allow_pickle=False) as data:  # an ordinary npz
        assert list(data["keys"]) == [utts[i].key for i in embedded]
        assert np.array_equal(data["rows"], embedded)
        assert np.array_equal(data["embeddings"], matrix[embedded])
        assert np.array_equal(data["seconds"], np.array(embedded) / 10)
        assert np.array_equal(data["chunks"], [3 if i % 50 == 1 else 1 for i in embedded])
    results = rankout.read_rank_results(out)
    assert isinstance(results.matrix, MappedNpy) and np.array_equal(results.matrix.array, matrix[embedded])
    assert rankout.read_rank_keys(out) == [utts[i].key for i in embedded]


def test_rank_pickles_from_the_npz(tmp_path):
    utts, matrix, parts, _ = make_parts(tmp_path, seed=1)
    out = tmp_path / "embeddings.npz"
    rankout.write_rank_npz(parts, rankout.ShardIndex(utts), out)
    rankout.write_rank_pickles(out, rankout.ShardIndex(utts), tmp_path / "u.pkl", tmp_path / "s.pkl")
    with open(tmp_path / "u.pkl", "rb") as handle:
        per_utt = pickle.load(handle)
    embedded = [i for i in range(len(utts)) if i % 23]
    assert list(per_utt) == [utts[i].key for i in embedded]
    assert all(np.array_equal(per_utt[utts[i].key]["embedding"], matrix[i]) for i in embedded)
    assert per_utt[utts[1].key]["path"] == "/x/1.wav"
    with open(tmp_path / "s.pkl", "rb") as handle:
        per_spk = pickle.load(handle)
    for spk, entry in per_spk.items():
        rows = [i for i in embedded if utts[i].speaker_key == spk]
        assert entry["num_utterances"] == len(rows)
        np.testing.assert_allclose(entry["embedding"], matrix[rows].astype(np.float64).mean(0), rtol=1e-6, atol=1e-7)


def test_earlier_rank_npz_is_read_and_sorted(tmp_path):
    keys = ["c", "a", "b"]
    np.savez(tmp_path / "old.npz", keys=np.array(keys), embeddings=np.arange(6, dtype=np.float32).reshape(3, 2),
             failures=np.array("[]"), extra=np.array(json.dumps({"a": {"seconds": 1.5}})))
    results = rankout.read_rank_results(tmp_path / "old.npz", lambda ks: {"a": 0, "b": 1, "c": 2})
    assert results.rows.tolist() == [0, 1, 2] and results.matrix[:, 0].tolist() == [2.0, 4.0, 0.0]
    assert results.seconds[0] == 1.5 and np.isnan(results.seconds[1])
