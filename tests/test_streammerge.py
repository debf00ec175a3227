"""The streamed merge writes exactly what the in-memory merge writes (small corpora)."""
import json
import pickle

import numpy as np
import pytest

from speakerlab import data as data_mod
from speakerlab import scanfile, streammerge
from speakerlab.data import ScanResult, Utterance, assign_keys

NAMES = {"scratch": ".scratch", "npy_matrix": "utterance_embeddings.npy", "npy_speaker_matrix": "speaker_embeddings.npy",
         "utterance_jsonl": "utterance_list.jsonl", "npy_index": "utterance_index.npy", "speaker_jsonl": "speaker_list.jsonl",
         "utterance_json": "utterance_list.json", "speaker_json": "speaker_list.json",
         "utterance_pkl": "utterance_embeddings.pkl", "speaker_pkl": "speaker_embeddings.pkl",
         "utterance_npz": "utterance_embeddings.npz", "speaker_npz": "speaker_embeddings.npz",
         "utterance_kaldi": ("xvector.ark", "xvector.scp"), "speaker_kaldi": ("spk_xvector.ark", "spk_xvector.scp")}


def synthetic_run(seed=0, count=240, dim=12):
    """A scan and the rank results of a run over it: speakers of 1-30 utterances (names that
    interleave in key order, a tagged pair), some failures, some chunked files, some outliers."""
    rng = np.random.default_rng(seed)
    utts, spk = [], 0
    while len(utts) < count:
        size = int(rng.integers(1, 30))
        name = ["p1", "p1_x", "a_b", "q"][spk % 4] + f"{spk}" if spk < 8 else f"s{spk:03d}"
        dataset = "vox" if spk % 2 else "libri"
        for u in range(size):
            utts.append(Utterance(key="", dataset=dataset, speaker=name, utterance=f"{'xyz'[u % 3]}{u}",
                                  path=f"/c/{dataset}/{name}/{u}.wav", rel_path=f"{dataset}/{name}/{u}.wav",
                                  sample_rate=16000, num_samples=int(rng.integers(8000, 160000)), channels=1))
        spk += 1
    assign_keys(utts)
    utts.sort(key=lambda u: u.key)
    scan = ScanResult("/c", utts, source={"type": "tree", "path": "/c"})
    centres = {s: rng.standard_normal(dim) * 2 for s in {u.speaker_key for u in utts}}
    keys, rows, failures, extra = [], [], [], {}
    for i, utt in enumerate(utts):
        if rng.random() < 0.06:
            failures.append({"key": utt.key, "path": utt.path, "stage": "decode", "reason": "bad"})
            continue
        row = centres[utt.speaker_key] + rng.standard_normal(dim) * rng.uniform(0.3, 1.5)
        if rng.random() < 0.04:
            row = -row
        keys.append(utt.key)
        rows.append(row.astype(np.float32))
        extra[utt.key] = {"seconds": round(utt.duration * 0.99, 4)}
        if rng.random() < 0.05:
            extra[utt.key]["chunks"] = 2
        if rng.random() < 0.05:
            del extra[utt.key]  # seconds not recorded: the scan's duration is used
    return scan, keys, np.stack(rows), failures, extra


def split_ranks(keys, matrix, failures, extra, world, seed):
    """Results of ``world`` ranks, each in its own (shuffled) order."""
    rng = np.random.default_rng(seed)
    owner = rng.integers(0, world, size=len(keys))
    out = []
    for r in range(world):
        mine = np.flatnonzero(owner == r)
        rng.shuffle(mine)
        out.append(([keys[i] for i in mine], matrix[mine], failures[r::world],
                    {keys[i]: extra[keys[i]] for i in mine if keys[i] in extra}))
    return out


def in_memory(scan, keys, matrix, failures, extra, rule, weighted, pairs):
    """The in-memory merge's numbers (merge.py's code path, without its rank dirs)."""
    from speakerlab import stats as stats_mod
    from speakerlab.merge import speaker_means
    utterances = {u.key: u for u in scan.utterances}
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    keys = [keys[i] for i in order]
    matrix = matrix[order]
    durations = np.array([extra.get(k, {}).get("seconds", utterances[k].duration) for k in keys])
    speaker_keys = sorted({utterances[k].speaker_key for k in keys})
    pos = {s: i for i, s in enumerate(speaker_keys)}
    index = np.array([pos[utterances[k].speaker_key] for k in keys])
    w = durations if weighted else None
    means = speaker_means(matrix, index, len(speaker_keys), rule, w)
    stats = stats_mod.speaker_statistics(keys, matrix, index, len(speaker_keys), rule, w)
    return {"keys": keys, "matrix": matrix, "durations": durations, "speaker_keys": speaker_keys, "means": means,
            "stats": stats, "counts": np.bincount(index), "pairs": stats_mod.closest_pairs(means, pairs),
            "seconds": np.bincount(index, weights=durations)}


@pytest.mark.parametrize("rule,weighted", [("plain", False), ("normalized", True)])
@pytest.mark.parametrize("world,block", [(1, 1000), (3, 7), (5, 64)])
def test_stream_merge_equals_in_memory(tmp_path, rule, weighted, world, block, monkeypatch):
    monkeypatch.setattr(scanfile, "GROUP_ROWS", 50)
    scan, keys, matrix, failures, extra = synthetic_run(seed=world)
    scanfile.save(scan, tmp_path / "scan.npz")
    row_of = {u.key: i for i, u in enumerate(scan.utterances)}
    ranks = [streammerge.results_from_arrays(*part, row_of)
             for part in split_ranks(keys, matrix, failures, extra, world, seed=world)]
    out = tmp_path / "out"
    out.mkdir()
    with scanfile.ScanFile(tmp_path / "scan.npz") as handle:
        got = streammerge.stream_merge([handle], [ranks], out, out, ["npy", "pkl", "npz", "kaldi"],
                                       NAMES, rule, weighted, 7, block_rows=block)
    want = in_memory(scan, keys, matrix, failures, extra, rule, weighted, 7)
    utterances = {u.key: u for u in scan.utterances}
    assert not (out / ".scratch").exists()

    npy = np.load(out / "utterance_embeddings.npy", mmap_mode="r")
    assert npy.dtype == np.float32 and np.array_equal(npy, want["matrix"])
    lines = [json.loads(line) for line in (out / "utterance_list.jsonl").read_text().splitlines()]
    assert [r["key"] for r in lines] == want["keys"]
    assert json.loads((out / "utterance_list.json").read_text()) == lines
    index = np.load(out / "utterance_index.npy")
    raw = (out / "utterance_list.jsonl").read_bytes()
    assert [json.loads(raw[o:raw.index(b"\n", o)])["key"] for o in index[:, 0]] == want["keys"]
    assert [want["speaker_keys"][s] for s in index[:, 1]] == [utterances[k].speaker_key for k in want["keys"]]
    assert [r["speaker_cosine"] for r in lines] == [round(float(c), 4) for c in want["stats"]["cosine"]]
    for record, seconds in zip(lines, want["durations"]):
        utt = utterances[record["key"]]
        assert record["duration"] == round(float(seconds), 4) and record["speaker_key"] == utt.speaker_key
        assert record.get("chunks", 1) == extra.get(record["key"], {}).get("chunks", 1)
    assert np.array_equal(np.load(out / "speaker_embeddings.npy"), want["means"])
    spk_lines = [json.loads(line) for line in (out / "speaker_list.jsonl").read_text().splitlines()]
    assert [r["key"] for r in spk_lines] == want["speaker_keys"]
    assert json.loads((out / "speaker_list.json").read_text()) == spk_lines
    for s, record in enumerate(spk_lines):
        assert record["outliers"] == want["stats"]["outliers"][s]
        assert record["mean_cosine"] == round(float(want["stats"]["mean_cosine"][s]), 4)
        assert record["num_utterances"] == want["counts"][s]
        assert record["duration_s"] == round(float(want["seconds"][s]), 3)
    assert sum(len(r["outliers"]) for r in spk_lines) > 0
    with open(out / "utterance_embeddings.pkl", "rb") as handle:
        pickled = pickle.load(handle)
    assert list(pickled) == want["keys"]
    assert all(np.array_equal(pickled[k]["embedding"], want["matrix"][i]) for i, k in enumerate(want["keys"]))
    with open(out / "speaker_embeddings.pkl", "rb") as handle:
        speakers = pickle.load(handle)
    assert list(speakers) == want["speaker_keys"] and speakers[want["speaker_keys"][0]]["outliers"] == \
        want["stats"]["outliers"][0]
    with np.load(out / "utterance_embeddings.npz", allow_pickle=False) as npz:
        assert list(npz["keys"]) == want["keys"] and np.array_equal(npz["embeddings"], want["matrix"])
    import kaldiio
    ark = kaldiio.load_scp(str(out / "xvector.scp"))
    assert np.array_equal(ark[want["keys"][3]], want["matrix"][3])
    assert got["total_duration_s"] == float(want["durations"].sum())
    assert got["closest_speaker_pairs"] == [[want["speaker_keys"][i], want["speaker_keys"][j], round(min(c, 1.0), 4)]
                                            for i, j, c in want["pairs"]]


def test_two_runs_merge_by_key_and_overlaps_are_refused(tmp_path):
    scan, keys, matrix, failures, extra = synthetic_run(seed=5, count=120)
    half = len(scan.utterances) // 2
    handles, runs = [], []
    for part, (lo, hi) in enumerate([(0, half), (half, len(scan.utterances))]):
        sub = ScanResult("/c", scan.utterances[lo:hi], source={"type": "tree", "path": "/c"})
        scanfile.save(sub, tmp_path / f"scan{part}.npz")
        mine = {u.key for u in sub.utterances}
        idx = [i for i, k in enumerate(keys) if k in mine]
        row_of = {u.key: i for i, u in enumerate(sub.utterances)}
        runs.append([streammerge.results_from_arrays([keys[i] for i in idx], matrix[idx], [], extra, row_of)])
        handles.append(scanfile.ScanFile(tmp_path / f"scan{part}.npz"))
    out = tmp_path / "out"
    out.mkdir()
    streammerge.stream_merge(handles[::-1], runs[::-1], out, out, ["npy"], NAMES)
    lines = [json.loads(line)["key"] for line in (out / "utterance_list.jsonl").read_text().splitlines()]
    assert lines == sorted(keys)
    assert np.array_equal(np.load(out / "utterance_embeddings.npy"), matrix[np.argsort(keys, kind="stable")])
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(streammerge.StreamMergeError, match="embedded twice"):
        streammerge.stream_merge([handles[0], handles[0]], [runs[0], runs[0]], again, again, ["npy"], NAMES)
    for handle in handles:
        handle.close()


def test_record_text_is_what_json_dumps_writes():
    utt = Utterance(key='k"ë\\1', dataset="d\tx", speaker="s", utterance="u", path="/p/ü.wav", rel_path="ü.wav",
                    sample_rate=16000, num_samples=1, start=0.25, end=None)
    want = {"key": utt.key, "dataset": utt.dataset, "speaker_id": "s", "speaker_key": utt.speaker_key,
            "utterance_id": "u", "path": utt.path, "rel_path": utt.rel_path, "duration": 1.2346,
            "sample_rate": 16000, "start": 0.25, "end": None, "chunks": 3}
    assert streammerge.record_text(utt, 1.23456789, 3) == json.dumps(want, ensure_ascii=False)
    utt.start = None
    del want["start"], want["end"], want["chunks"]
    assert streammerge.record_text(utt, 1.23456789, 1) == json.dumps(want, ensure_ascii=False)
