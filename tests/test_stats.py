"""Speaker statistics against direct numpy computations and brute force."""
import numpy as np
import pytest

from speakerlab import stats
from speakerlab.merge import speaker_means


def corpus(seed=0, counts=(1, 2, 3, 4, 5, 7, 12, 60), dim=16):
    """Speakers of various sizes: a centre each plus noise; rows shuffled across speakers."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(counts), dim)) * 3
    index = np.concatenate([np.full(n, s) for s, n in enumerate(counts)])
    rng.shuffle(index)
    scale = rng.uniform(0.5, 4.0, size=(len(index), 1))  # norms differ, so plain != normalized
    matrix = ((centres[index] + rng.standard_normal((len(index), dim))) * scale).astype(np.float32)
    weights = rng.uniform(0.5, 8.0, size=len(index))
    return matrix, index, len(counts), weights


def unit(v):
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("rule", ["plain", "normalized"])
@pytest.mark.parametrize("weighted", [False, True])
def test_speaker_means_match_numpy(rule, weighted):
    matrix, index, num, weights = corpus()
    got = speaker_means(matrix, index, num, rule, weights if weighted else None)
    for s in range(num):
        rows = matrix[index == s].astype(np.float64)
        if rule == "normalized":
            rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        w = weights[index == s] if weighted else np.ones(len(rows))
        np.testing.assert_allclose(got[s], (rows * w[:, None]).sum(0) / w.sum(), rtol=1e-5, atol=1e-6)


def test_plain_and_normalized_means_differ_when_norms_differ():
    matrix, index, num, _ = corpus()
    plain = speaker_means(matrix, index, num, "plain")
    norm = speaker_means(matrix, index, num, "normalized")
    many = np.bincount(index) > 1
    assert not np.allclose(plain[many], norm[many], atol=1e-3)
    # a single utterance: plain mean is the utterance, normalized mean its unit vector
    single = int(np.flatnonzero(np.bincount(index) == 1)[0])
    row = matrix[index == single][0]
    np.testing.assert_allclose(plain[single], row, rtol=1e-6)
    np.testing.assert_allclose(norm[single], unit(row.astype(np.float64)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["plain", "normalized"])
@pytest.mark.parametrize("weighted", [False, True])
def test_cosines_match_direct_computation(rule, weighted, monkeypatch):
    monkeypatch.setattr(stats, "CHUNK_ROWS", 7)  # several chunks
    matrix, index, num, weights = corpus(seed=1)
    w = weights if weighted else None
    to_centroid, to_others = stats.speaker_cosines(matrix, index, num, rule, w)
    centroids = speaker_means(matrix, index, num, rule, w)
    for i, row in enumerate(matrix.astype(np.float64)):
        s = index[i]
        members = np.flatnonzero(index == s)
        if len(members) == 1:
            assert to_centroid[i] == 1.0 and np.isnan(to_others[i])
            continue
        assert to_centroid[i] == pytest.approx(unit(row) @ unit(centroids[s].astype(np.float64)), abs=1e-6)
        others = [j for j in members if j != i]
        rows = matrix[others].astype(np.float64)
        if rule == "normalized":
            rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        ow = weights[others] if weighted else np.ones(len(others))
        loo = (rows * ow[:, None]).sum(0) / ow.sum()
        assert to_others[i] == pytest.approx(unit(row) @ unit(loo), abs=1e-9)


def reference_flags(scores, index, num):
    """The documented rule, written out one utterance at a time."""
    flags = np.zeros(len(scores), dtype=bool)
    for s in range(num):
        members = np.flatnonzero(index == s)
        n = len(members)
        if n < stats.MIN_UTTERANCES:
            continue
        for i in members:
            pool = scores[members] if n > stats.EXACT_MAX else scores[[j for j in members if j != i]]
            med = np.median(pool)
            mad = np.median(np.abs(pool - med))
            flags[i] = scores[i] < med - stats.OUTLIER_K * max(stats.MAD_SCALE * mad, stats.SPREAD_FLOOR)
    return flags


def test_outlier_flags_match_reference_rule():
    rng = np.random.default_rng(2)
    counts = [1, 2, 3, 3, 4, 5, 6, 9, 50, 51, 120] + list(rng.integers(3, 30, size=30))
    index = np.concatenate([np.full(n, s) for s, n in enumerate(counts)])
    rng.shuffle(index)
    spread = rng.uniform(0.01, 0.2, size=len(counts))
    scores = 0.7 + spread[index] * rng.standard_normal(len(index))
    drop = rng.random(len(index)) < 0.08
    scores[drop] -= rng.uniform(0.1, 0.8, size=drop.sum())
    got = stats.outlier_flags(scores, index, len(counts))
    want = reference_flags(scores, index, len(counts))
    np.testing.assert_array_equal(got, want)
    assert 0 < got.sum() < drop.sum() + 5  # the test is not vacuous


def test_outlier_rule_on_small_speakers():
    index = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3])
    scores = np.array([0.80, 0.78, 0.20,          # 3 utterances, one far off: flagged
                       0.70, 0.72, 0.71, 0.60,    # tight speaker, a 0.1 wobble: the floor keeps it
                       0.90, 0.10,                # 2 utterances: nothing tells which one is wrong
                       0.50, 0.82, 0.85, 0.80])   # drop of 0.32 < 3.5 * 0.1: kept
    flags = stats.outlier_flags(scores, index, 4)
    assert np.flatnonzero(flags).tolist() == [2]


def test_speaker_statistics_fields():
    matrix, index, num, _ = corpus(seed=3)
    matrix[np.flatnonzero(index == 7)[0]] *= -1  # one utterance pointing the other way
    keys = [f"u{i:03d}" for i in range(len(matrix))]
    result = stats.speaker_statistics(keys, matrix, index, num, "normalized")
    for s in range(num):
        members = index == s
        np.testing.assert_allclose(result["mean_cosine"][s], result["cosine"][members].mean())
        np.testing.assert_allclose(result["min_cosine"][s], result["cosine"][members].min())
        flagged = [keys[i] for i in np.flatnonzero(members & result["outlier"])]
        assert sorted(result["outliers"][s]) == sorted(flagged)
    assert result["outliers"][7] == [keys[np.flatnonzero(index == 7)[0]]]
    block = stats.summary_block(np.bincount(index), result)
    assert block["speakers_with_fewer_than_2_utterances"] == 1
    assert block["speakers_with_outliers"] == sum(1 for o in result["outliers"] if o)


def brute_pairs(matrix, k):
    rows = matrix.astype(np.float64)
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    sims = rows @ rows.T
    i, j = np.triu_indices(len(rows), 1)
    order = np.lexsort((j, i, -sims[i, j]))[:k]
    return [(int(i[o]), int(j[o]), float(sims[i[o], j[o]])) for o in order]


@pytest.mark.parametrize("count,block,k", [(0, 4, 5), (1, 4, 5), (2, 4, 5), (7, 3, 100), (16, 16, 10),
                                           (17, 16, 10), (31, 16, 10), (33, 16, 10), (100, 7, 25),
                                           (64, 1, 3), (50, 64, 1), (40, 8, 0)])
def test_closest_pairs_equal_brute_force(count, block, k):
    matrix = np.random.default_rng(count * 31 + block).standard_normal((count, 12)).astype(np.float32)
    got = stats.closest_pairs(matrix, k=k, block=block)
    want = brute_pairs(matrix, k) if count > 1 else []
    assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in want]
    np.testing.assert_allclose([c for *_, c in got], [c for *_, c in want], atol=1e-12)


def test_closest_pairs_ties_and_duplicates():
    base = np.random.default_rng(5).standard_normal((6, 10))
    matrix = np.repeat(base, 3, axis=0) * np.arange(1, 19)[:, None]  # 6 identities, 3 scaled copies each
    got = stats.closest_pairs(matrix, k=18, block=4)  # exactly the 18 duplicate pairs, all at cosine 1
    assert len(got) == 18
    assert all(c == pytest.approx(1.0) for *_, c in got)
    assert {(a // 3, b // 3) for a, b, _ in got} == {(s, s) for s in range(6)}


def test_closest_pairs_exact_beyond_float32():
    """The float32 screen must not decide the order: pairs whose cosines differ by less than float32
    can tell apart come out in their exact float64 order, with float64 values."""
    rng = np.random.default_rng(11)
    base = rng.standard_normal(16)
    tiny = rng.standard_normal((8, 16))
    # rows 0..7: base nudged by 1e-5 * i * noise; pair (0, i) cosines fall as i grows, 1e-9 apart or so
    matrix = np.vstack([base + 1e-5 * i * tiny[i] for i in range(8)] + [rng.standard_normal((40, 16))])
    got = stats.closest_pairs(matrix, k=10, block=5)
    want = brute_pairs(matrix, 10)
    assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in want]
    np.testing.assert_allclose([c for *_, c in got], [c for *_, c in want], rtol=0, atol=1e-15)
    assert len({np.float32(c) for *_, c in got[:5]}) < 5  # float32 alone could not have ordered them
