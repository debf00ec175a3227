"""Streamed speaker statistics (blocks of a memory-mapped matrix) equal the in-memory ones exactly."""
import numpy as np
import pytest

from speakerlab import stats, streamstats
from speakerlab.merge import speaker_means
from speakerlab.npyfile import MappedNpy, NpyWriter, write_npy


def corpus(seed=0, counts=(1, 2, 3, 4, 5, 7, 12, 60, 3, 9), dim=16, sort=False):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(counts), dim)) * 3
    index = np.concatenate([np.full(n, s) for s, n in enumerate(counts)])
    rng.shuffle(index)
    if sort:  # rows mostly grouped by speaker, as in a key-sorted merge, with a few interleaved
        index = np.sort(index)
        swap = rng.choice(len(index), size=6, replace=False)
        index[swap] = index[swap[::-1]]
    scale = rng.uniform(0.5, 4.0, size=(len(index), 1))
    matrix = ((centres[index] + rng.standard_normal((len(index), dim))) * scale).astype(np.float32)
    far = [np.flatnonzero(index == s)[0] for s in (6, 7, 9)]
    matrix[far] *= -1  # outliers to find
    weights = rng.uniform(0.5, 8.0, size=len(index))
    return matrix, index, len(counts), weights


@pytest.mark.parametrize("rule", ["plain", "normalized"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("sort", [False, True])
@pytest.mark.parametrize("block,group", [(5, 7), (64, 3), (1000, streamstats.OUTLIER_ROWS)])
def test_streamed_statistics_identical_to_in_memory(tmp_path, rule, weighted, sort, block, group, monkeypatch):
    matrix, index, num, weights = corpus(seed=1, sort=sort)
    w = weights if weighted else None
    keys = [f"u{i:04d}" for i in range(len(matrix))]
    want = stats.speaker_statistics(keys, matrix, index, num, rule, w)
    want_means = speaker_means(matrix, index, num, rule, w)

    write_npy(tmp_path / "m.npy", matrix)
    write_npy(tmp_path / "s.npy", index.astype(np.int32))
    write_npy(tmp_path / "w.npy", weights)
    rows, spk = MappedNpy(tmp_path / "m.npy"), MappedNpy(tmp_path / "s.npy")
    wsrc = MappedNpy(tmp_path / "w.npy") if weighted else None
    monkeypatch.setattr(streamstats, "OUTLIER_ROWS", group)
    got = streamstats.statistics(rows, spk, num, tmp_path, rule, wsrc, key_of=lambda r: [keys[i] for i in r],
                                 block_rows=block)
    assert np.array_equal(got["acc"].means(), want_means)
    assert np.array_equal(np.load(tmp_path / "to_centroid.npy"), want["cosine"])
    assert np.array_equal(np.load(tmp_path / "to_others.npy"), want["loo_cosine"], equal_nan=True)
    assert np.array_equal(got["mean_cosine"], want["mean_cosine"])
    assert np.array_equal(got["min_cosine"], want["min_cosine"])
    assert got["outliers"] == want["outliers"]
    assert sum(map(len, got["outliers"])) >= 2  # not vacuous
    assert stats.summary_block(got["acc"].counts, streamstats.summary_view(got)) == \
        stats.summary_block(np.bincount(index), want)


def test_accumulator_fed_in_pieces_equals_one_pass(tmp_path):
    matrix, index, num, weights = corpus(seed=4)
    whole = streamstats.accumulate(matrix, index, num, "normalized", weights)
    pieces = streamstats.SpeakerAccumulator(num, matrix.shape[1], "normalized", weighted=True)
    for cut in np.array_split(np.arange(len(matrix)), 9):
        pieces.add(matrix[cut], index[cut], weights[cut])
    assert np.array_equal(whole.sums, pieces.sums) and np.array_equal(whole.means(), pieces.means())
    assert np.array_equal(pieces.counts, np.bincount(index, minlength=num))
    for s in range(num):
        rows = np.flatnonzero(index == s)
        assert pieces.first_row[s] == rows[0] and pieces.last_row[s] == rows[-1]


def test_npy_writer_refuses_a_wrong_row_count(tmp_path):
    writer = NpyWriter(tmp_path / "x.npy", 3, (2,))
    writer.write(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="2 rows written, 3 announced"):
        writer.close()
    assert list(tmp_path.iterdir()) == []  # nothing half-written left
    with pytest.raises(ValueError, match="more than"):
        NpyWriter(tmp_path / "y.npy", 1, (2,)).write(np.zeros((2, 2)))


def test_mapped_npy_reads_blocks_and_np_load_mmap_agrees(tmp_path):
    data = np.random.default_rng(0).standard_normal((1001, 5)).astype(np.float32)
    with NpyWriter(tmp_path / "x.npy", len(data), (5,)) as writer:
        for part in np.array_split(data, 4):
            writer.write(part)
    assert np.array_equal(np.load(tmp_path / "x.npy", mmap_mode="r"), data)
    mapped = MappedNpy(tmp_path / "x.npy")
    assert np.array_equal(np.concatenate([b for _, b in mapped.blocks(100)]), data)
    assert np.array_equal(mapped.take(np.array([7, 3, 1000])), data[[7, 3, 1000]])
    mapped.close()
    (tmp_path / "cut.npy").write_bytes((tmp_path / "x.npy").read_bytes()[:-10])
    with pytest.raises(ValueError, match="cut short"):
        MappedNpy(tmp_path / "cut.npy")


@pytest.mark.parametrize("positioned", [True, False])
def test_mapped_npy_reads_from_threads_at_once(tmp_path, positioned, monkeypatch):
    """``read`` is safe from several threads (similar() scans ranges in parallel), with os.preadv
    and, where the OS lacks it, with the locked seek-and-read fallback."""
    from concurrent.futures import ThreadPoolExecutor
    if not positioned:
        monkeypatch.delattr("os.preadv", raising=False)
    data = np.random.default_rng(1).standard_normal((5000, 7)).astype(np.float32)
    with NpyWriter(tmp_path / "x.npy", len(data), (7,)) as writer:
        writer.write(data)
    mapped = MappedNpy(tmp_path / "x.npy")

    def read(start):
        return start, mapped.read(start, start + 37).copy()
    with ThreadPoolExecutor(4) as pool:
        for start, rows in pool.map(read, list(range(0, 5000, 37)) * 3):
            assert np.array_equal(rows, data[start:start + 37])
    mapped.close()
