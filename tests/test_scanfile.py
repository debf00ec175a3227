"""The columnar scan file, contiguous duration-balanced shards, and header reads shared by ranks."""
import json
import zipfile

import numpy as np
import pytest

from speakerlab import data as data_mod
from speakerlab import scanfile
from speakerlab.data import ScanResult, Utterance, assign_keys


def utterances(count=300, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        spk = i // 7
        dataset = "vox" if spk % 3 else "lïbri"
        utt = Utterance(key="", dataset=dataset, speaker=f"s{spk:03d}", utterance=f"u{i:04d}",
                        path=f"/data/root/{dataset}/s{spk:03d}/u{i:04d}.wav",
                        rel_path=f"{dataset}/s{spk:03d}/u{i:04d}.wav",
                        sample_rate=int(rng.choice([8000, 16000, 44100])), num_samples=int(rng.integers(0, 10 ** 6)),
                        channels=int(rng.integers(1, 3)))
        if i % 50 == 3:
            utt.header_error = "cannot open: no such file"
        if i % 40 == 5:  # a segment of a file elsewhere
            utt.path, utt.rel_path, utt.start, utt.end = f"/elsewhere/rec{i}.flac", f"/elsewhere/rec{i}.flac", 1.5, None
        if i % 40 == 6:
            utt.start, utt.end = 0.25, 3.0
        out.append(utt)
    # names that join into one key get tagged keys (speaker and utterance level)
    out.append(Utterance(key="", dataset="vox", speaker="a_b", utterance="c", path="/data/root/vox/a_b/c.wav",
                         rel_path="vox/a_b/c.wav", sample_rate=16000, num_samples=16000, channels=1))
    out.append(Utterance(key="", dataset="vox_a", speaker="b", utterance="c", path="/data/root/vox_a/b/c.wav",
                         rel_path="vox_a/b/c.wav", sample_rate=16000, num_samples=16000, channels=1))
    renames = assign_keys(out)
    out.sort(key=lambda u: u.key)
    return ScanResult("/data/root", out, {"not an audio extension": 3}, ["x.txt: not an audio extension"],
                      {"type": "tree", "path": "/data/root"}, [{"path": "/data/root/bad", "stage": "scan",
                                                               "reason": "cannot list directory"}], renames)


def test_round_trip_is_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(scanfile, "GROUP_ROWS", 64)  # several groups
    scan = utterances()
    meta = scanfile.save(scan, tmp_path / "scan.npz")
    again = scanfile.load(tmp_path / "scan.npz")
    assert again == scan
    assert any(u.spk_key for u in again.utterances) and again.renames
    assert meta["keys_sha1"] == data_mod.keys_digest(scan.utterances) and meta["count"] == len(scan.utterances)
    with zipfile.ZipFile(tmp_path / "scan.npz") as archive:  # no per-file JSON: numbers and UTF-8 columns
        assert all(name.endswith(".npy") for name in archive.namelist())
    with np.load(tmp_path / "scan.npz", allow_pickle=False) as plain:  # numpy opens it, no pickle needed
        assert json.loads(plain["meta"].tobytes())["count"] == len(scan.utterances)


def test_row_ranges_read_only_their_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(scanfile, "GROUP_ROWS", 64)
    scan = utterances()
    scanfile.save(scan, tmp_path / "scan.npz")
    with scanfile.ScanFile(tmp_path / "scan.npz") as handle:
        for start, stop in [(0, 0), (0, 1), (63, 65), (64, 128), (100, 302), (250, 10 ** 6)]:
            assert handle.rows(start, stop) == scan.utterances[start:stop]
        np.testing.assert_array_equal(handle.durations(), [u.duration for u in scan.utterances])
        read = []

        class Recorder:
            def __getitem__(self, name, real=handle._npz):
                read.append(name)
                return real[name]

            def close(self, real=handle._npz):
                real.close()
        monkeypatch.setattr(handle, "_npz", Recorder())
        handle.rows(130, 140)
        assert {name.split(".")[0] for name in read} == {"g2"}  # only the group that holds the rows


def test_compact_size(tmp_path):
    rows = []
    for i in range(20000):  # a tree of typical names: about 15 MB per million files
        spk = i // 40
        rows.append(Utterance(key=f"ds{spk % 4}_spk{spk:06d}_utt{i % 40:04d}", dataset=f"ds{spk % 4}",
                              speaker=f"spk{spk:06d}", utterance=f"utt{i % 40:04d}",
                              path=f"/data/corpus/ds{spk % 4}/spk{spk:06d}/utt{i % 40:04d}.wav",
                              rel_path=f"ds{spk % 4}/spk{spk:06d}/utt{i % 40:04d}.wav", sample_rate=16000,
                              num_samples=16000 * (2 + i % 15), channels=1))
    scanfile.save(ScanResult("/data/corpus", rows), tmp_path / "scan.npz")
    per_million = (tmp_path / "scan.npz").stat().st_size * 1e6 / len(rows) / 2 ** 20
    assert per_million < 40


@pytest.mark.parametrize("world", [1, 2, 3, 7, 16])
def test_shard_bounds_contiguous_balanced_complete(world):
    rng = np.random.default_rng(world)
    durations = rng.exponential(5.0, size=2000)
    durations[::97] = 0.0  # unreadable headers weigh 10 ms
    bounds = data_mod.shard_bounds(durations, world)
    assert bounds[0] == 0 and bounds[-1] == len(durations) and len(bounds) == world + 1
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    weights = np.maximum(durations, 0.01)
    loads = [weights[a:b].sum() for a, b in zip(bounds, bounds[1:])]
    assert max(loads) - min(loads) <= 2 * weights.max() + 1e-9
    scan = [Utterance(key=f"k{i:05d}", dataset="d", speaker="s", utterance=str(i), path=str(i), sample_rate=1,
                      num_samples=int(d * 1000) / 1000 * 1) for i, d in enumerate(durations)]
    shards = [data_mod.shard_by_duration(scan, r, world) for r in range(world)]
    assert [u.key for shard in shards for u in shard] == [u.key for u in scan]  # every row once, in order


def test_shard_bounds_edge_cases():
    assert data_mod.shard_bounds([], 3) == [0, 0, 0, 0]
    assert data_mod.shard_bounds([1.0, 1.0], 4)[-1] == 2
    assert data_mod.shard_bounds([5.0] * 8, 1) == [0, 8]


def test_header_slices_cover_every_row_once():
    for count in (0, 1, 5, 1000, 1001):
        for world in (1, 2, 3, 8):
            slices = [data_mod.header_slice(count, r, world) for r in range(world)]
            assert slices[0][0] == 0 and slices[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
            assert max(b - a for a, b in slices) - min(b - a for a, b in slices) <= 1


def test_header_files_gather_into_the_scan(tmp_path, monkeypatch):
    monkeypatch.setattr(scanfile, "GROUP_ROWS", 64)
    full = utterances()
    walked = utterances()
    for utt in walked.utterances:  # as the walk leaves them: no header read yet
        utt.sample_rate = utt.num_samples = utt.channels = 0
        utt.header_error = ""
    world = 3
    for rank in range(world):
        start, stop = data_mod.header_slice(len(full.utterances), rank, world)
        scanfile.save_headers(tmp_path / f"h{rank}.npz", start, full.utterances[start:stop], "run-1")
    assert scanfile.load_headers(tmp_path / "h0.npz", "run-2") is None  # another run's file is not taken
    assert scanfile.load_headers(tmp_path / "missing.npz", "run-1") is None
    for rank in range(world):
        start, columns = scanfile.load_headers(tmp_path / f"h{rank}.npz", "run-1")
        scanfile.apply_headers(walked.utterances[start:start + len(columns["rate"])], columns)
    assert walked.utterances == full.utterances


def test_ranks_share_the_header_reads(tmp_path, monkeypatch):
    """Each rank reads its slice (counted), rank 0 gathers them into the scan; a rank's error stops it."""
    import soundfile as sf
    from speakerlab.extract import headers
    monkeypatch.setattr(scanfile, "GROUP_ROWS", 4)
    for i in range(11):
        sf.write(str(_wav(tmp_path, i)), np.zeros(160 * (i + 1)), 16000)
    (tmp_path / "data" / "ds" / "s1" / "bad.wav").write_bytes(b"RIFF junk")
    walked = data_mod.scan_tree(tmp_path / "data")
    scanfile.save(walked, tmp_path / "walk.npz", headers_read=False)
    paths = [tmp_path / f"h{r}.npz" for r in range(3)]
    read = [headers.read_slice(tmp_path / "walk.npz", r, 3, paths[r], "run-7", 2) for r in range(3)]
    assert read == [4, 4, 4]
    counts = headers.gather(walked, paths, "run-7", timeout=1)
    assert counts == read
    again = data_mod.scan_tree(tmp_path / "data")
    data_mod.read_headers(again.utterances)
    assert walked.utterances == again.utterances and any(u.header_error for u in again.utterances)
    with pytest.raises(RuntimeError, match="did not read their share"):
        headers.gather(walked, paths, "run-8", timeout=0.01, poll=0.01)
    scanfile.save_headers(paths[1], 0, [], "run-7", error="rank 1: OSError: disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        headers.gather(walked, paths, "run-7", timeout=1)


def _wav(root, i):
    path = root / "data" / "ds" / f"s{i % 2}" / f"u{i:02d}.wav"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
