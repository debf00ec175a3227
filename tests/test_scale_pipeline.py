"""At scale, end to end on a small corpus: ranks share the header reads and read only their shard of the
scan file; the streamed merge's npy set equals the in-memory merge's pickles, npz and lists; the API,
score and report work on the npy set; resume still holds."""
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

import speakerlab
from speakerlab import merge as merge_mod
from speakerlab.mapped import MappedEmbeddingSet
from tests.helpers import ROOT, micro_model, tone, write_wav
from tests.test_cluster import finish, slurm_env, start

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two ranks (srun style: no process group) over a tree with several datasets and a broken file."""
    tmp = tmp_path_factory.mktemp("scale")
    model = [str(a) for a in micro_model(tmp / "model")]
    data = tmp / "data"
    n = 0
    for d, dataset in enumerate(["vox", "libri", "cv"]):
        for s in range(3):
            for u in range(2 + (s + d) % 4):
                write_wav(data / dataset / f"spk{s}" / f"u{u}.wav", tone(0.4 + 0.13 * n, seed=n, freq=120 + 15 * s))
                n += 1
    (data / "cv" / "spk0" / "broken.wav").write_bytes(b"RIFF nothing")
    out = tmp / "tmp"
    cmd = [sys.executable, "extract_speaker_embeddings.py", "--data_root", data, "--output_dir", out, *model,
           "--dtype", "fp32", "--num_workers", "0", "--no_progress", "--flush_every", "3"]
    procs = [start(cmd, slurm_env(rank, 2, job="9001")) for rank in (1, 0)]
    logs = [text for _, text in finish(procs)]
    codes = [p.returncode for p in procs]
    return {"tmp": tmp, "data": data, "out": out, "cmd": cmd, "logs": logs, "codes": codes, "files": n + 1}


def run_merge(*args):
    return subprocess.run([sys.executable, str(ROOT / "merge_embeddings.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def test_ranks_share_the_header_reads_and_resume(corpus):
    assert corpus["codes"] == [0, 0], corpus["logs"]
    text = "\n".join(corpus["logs"])
    counts = [int(line.split("read the headers of ")[1].split(" ")[0]) for line in text.splitlines()
              if "read the headers of" in line]
    assert sorted(counts) == [corpus["files"] // 2, corpus["files"] - corpus["files"] // 2]  # half each
    out = corpus["out"]
    assert (out / "scan.npz").is_file() and not list(out.glob("scan.walk*")) and not list(out.glob("scan.head*"))
    from speakerlab.scanfile import ScanFile
    with ScanFile(out / "scan.npz") as scan:
        bounds = scan.meta["shard_bounds"]
        assert scan.meta["shard_world"] == 2 and bounds[0] == 0 and bounds[-1] == corpus["files"]
        durations = scan.durations()
    loads = [durations[a:b].sum() for a, b in zip(bounds, bounds[1:])]
    assert abs(loads[0] - loads[1]) <= durations.max() + 0.01  # balanced by duration, contiguous
    metas = [json.loads((out / f"rank_0{r}" / "metadata.json").read_text()) for r in range(2)]
    assert [m["counts"]["assigned"] for m in metas] == [b - a for a, b in zip(bounds, bounds[1:])]
    assert sum(m["counts"]["failed"] for m in metas) == 1
    with np.load(out / "rank_01" / "embeddings.npz") as rank:  # rows in scan order, contiguous shard
        rows = rank["rows"]
        assert np.all(np.diff(rows) > 0) and rows[0] >= bounds[1]
    again = [start(corpus["cmd"], slurm_env(rank, 2, job="9001", step="1")) for rank in (1, 0)]
    results = finish(again)
    assert all(code == 0 for code, _ in results) and all("already complete" in t for _, t in results)


def test_npy_set_equals_the_pickles_and_lists(corpus):
    tmp, out = corpus["tmp"], corpus["out"]
    small = run_merge("--input_dir", out, "--output_dir", tmp / "mem", "--formats", "pkl,npz,kaldi")
    assert small.returncode == 0, small.stderr
    big = run_merge("--input_dir", out, "--output_dir", tmp / "npy", "--formats", "npy,pkl,kaldi")
    assert big.returncode == 0, big.stderr
    assert "utterance_embeddings.npy" in big.stderr and "mmap_mode" in big.stderr  # says what and how
    mem, npy = tmp / "mem", tmp / "npy"
    with np.load(mem / "utterance_embeddings.npz") as data:
        keys, matrix = list(data["keys"]), data["embeddings"]
    assert np.array_equal(np.load(npy / "utterance_embeddings.npy", mmap_mode="r"), matrix)
    lines = [json.loads(line) for line in (npy / "utterance_list.jsonl").read_text().splitlines()]
    assert lines == json.loads((mem / "utterance_list.json").read_text())
    assert [r["key"] for r in lines] == keys
    speakers = [json.loads(line) for line in (npy / "speaker_list.jsonl").read_text().splitlines()]
    assert speakers == json.loads((mem / "speaker_list.json").read_text())
    with np.load(mem / "speaker_embeddings.npz") as data:
        assert np.array_equal(np.load(npy / "speaker_embeddings.npy"), data["embeddings"])
    for name in ("utterance_embeddings.pkl", "speaker_embeddings.pkl"):
        with open(mem / name, "rb") as a, open(npy / name, "rb") as b:
            left, right = pickle.load(a), pickle.load(b)
        assert list(left) == list(right)
        for key in left:
            assert np.array_equal(left[key].pop("embedding"), right[key].pop("embedding")) and left[key] == right[key]
    assert (mem / "failures.json").read_text() == (npy / "failures.json").read_text()
    assert (mem / "xvector.ark").read_bytes() == (npy / "xvector.ark").read_bytes()
    a, b = (json.loads((d / "summary.json").read_text()) for d in (mem, npy))
    for volatile in ("formats", "files", "created", "merge_command"):
        a.pop(volatile), b.pop(volatile)
    assert a == b and a["failures"] == 1


def test_api_score_and_report_on_the_npy_set(corpus, capsys):
    tmp = corpus["tmp"]
    if not (tmp / "npy").is_dir():
        assert run_merge("--input_dir", corpus["out"], "--output_dir", tmp / "npy", "--formats", "npy").returncode == 0
        assert run_merge("--input_dir", corpus["out"], "--output_dir", tmp / "mem").returncode == 0
    emb, ref = speakerlab.load_embeddings(tmp / "npy"), speakerlab.load_embeddings(tmp / "mem")
    assert isinstance(emb, MappedEmbeddingSet) and len(emb) == len(ref)
    key = ref.keys[3]
    assert [m.key for m in emb.similar(key, k=4)] == [m.key for m in ref.similar(key, k=4)]
    assert list(emb.by_dataset("libri").keys) == ref.by_dataset("libri").keys
    assert emb.speaker_of(key) == ref.speaker_of(key)
    trials = tmp / "trials.txt"
    trials.write_text("".join(f"{a} {b} {'target' if ref.speaker_of(a) == ref.speaker_of(b) else 'nontarget'}\n"
                              for a in ref.keys[:6] for b in ref.keys[6:12]))
    from speakerlab import score
    got = score.score_trials(tmp / "npy", trials)
    want = score.score_trials(tmp / "mem", trials)
    assert np.array_equal(got["scores"], want["scores"]) and got["eer"] == want["eer"]
    from speakerlab import report
    assert report.main([str(tmp / "npy")]) == 0
    npy_report = capsys.readouterr().out
    assert report.main([str(tmp / "mem")]) == 0
    assert capsys.readouterr().out.replace(str(tmp / "mem"), "DIR") == npy_report.replace(str(tmp / "npy"), "DIR")


def test_merge_writes_the_npy_set_by_default_above_the_threshold(corpus, monkeypatch):
    monkeypatch.setattr(merge_mod, "STREAM_ABOVE", 5)
    final = corpus["tmp"] / "auto"
    summary = merge_mod.merge([corpus["out"]], final)
    assert summary["formats"] == ["npy"]
    assert (final / "utterance_embeddings.npy").is_file() and not (final / "utterance_embeddings.pkl").exists()
    assert isinstance(speakerlab.load_embeddings(final), MappedEmbeddingSet)
