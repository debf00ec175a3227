"""Manifests (CSV/TSV/JSONL/JSON) and Kaldi data dirs as inputs; segments of long recordings."""
import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from speakerlab import extract, manifest, merge
from speakerlab.audio import AudioError, load_audio
from speakerlab.data import DataError, Utterance, read_header
from tests.helpers import tiny_model_args, tone, write_wav


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- manifests -----------------------------------------------------------------------------
def test_csv_manifest_paths_ids_and_segments(tmp_path):
    write_wav(tmp_path / "audio" / "a.wav", tone(1.0))
    m = write(tmp_path / "lists" / "m.csv",
              "path,Speaker_ID,dataset,utterance,start,end,gender\n"
              "../audio/a.wav,s1,dsA,,,,f\n"          # whole file, id from the file name
              "../audio/a.wav,s1,dsA,,0.25,0.75,f\n"  # segment, id with its times
              "../audio/a.wav,s2,,mine,0.5,,m\n"      # to the end; dataset from the default
              f"{tmp_path}/audio/a.wav,s3,dsB,abs,,,m\n")
    scan = manifest.read_manifest(m, dataset="dflt")
    by_key = {u.key: u for u in scan.utterances}
    assert sorted(by_key) == ["dflt_s2_mine", "dsA_s1_a", "dsA_s1_a_00000250_00000750", "dsB_s3_abs"]
    assert [u.key for u in scan.utterances] == sorted(by_key)
    whole = by_key["dsA_s1_a"]
    assert whole.path == str(tmp_path / "audio" / "a.wav") and whole.start is None and whole.end is None
    assert whole.rel_path == str(tmp_path / "audio" / "a.wav")  # outside the manifest's folder: absolute
    seg = by_key["dsA_s1_a_00000250_00000750"]
    assert (seg.start, seg.end, seg.speaker, seg.dataset) == (0.25, 0.75, "s1", "dsA")
    assert (by_key["dflt_s2_mine"].start, by_key["dflt_s2_mine"].end) == (0.5, None)
    assert scan.data_root == str(tmp_path / "lists")
    # --data_root as the base of relative paths
    scan = manifest.read_manifest(write(tmp_path / "m2.csv", "path,speaker,dataset\naudio/a.wav,s1,d\n"),
                                  data_root=tmp_path)
    assert scan.utterances[0].path == str(tmp_path / "audio" / "a.wav")
    assert scan.utterances[0].rel_path == "audio/a.wav"


def test_jsonl_tsv_and_json_manifests_agree(tmp_path):
    rows = [{"path": "x/a.flac", "speaker": "s1", "dataset": "d", "start": 1.5, "end": 2.0},
            {"path": "x/b.wav", "speaker": 7, "dataset": "d", "utterance_id": "u9"}]
    jsonl = write(tmp_path / "m.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    as_json = write(tmp_path / "m.json", json.dumps(rows))
    tsv = write(tmp_path / "m.tsv", "path\tspeaker\tdataset\tstart\tend\tutterance_id\n"
                                    "x/a.flac\ts1\td\t1.5\t2.0\t\nx/b.wav\t7\td\t\t\tu9\n")
    scans = [manifest.read_manifest(p) for p in (jsonl, as_json, tsv)]
    for scan in scans:
        assert [(u.key, u.start, u.end, u.rel_path) for u in scan.utterances] == [
            ("d_7_u9", None, None, "x/b.wav"), ("d_s1_a_00001500_00002000", 1.5, 2.0, "x/a.flac")]


@pytest.mark.parametrize("name,text,message", [
    ("m.csv", "file,speaker\na.wav,s\n", "no 'path' column"),
    ("m.csv", "path,speaker,dataset\na.wav,,d\n", "m.csv:2: empty speaker"),
    ("m.csv", "path,speaker\na.wav,s\n", "m.csv:2: no dataset"),
    ("m.csv", "path,speaker,dataset,start\na.wav,s,d,soon\n", "m.csv:2: start 'soon' is not a number"),
    ("m.csv", "path,speaker,dataset,start,end\na.wav,s,d,2,1\n", "m.csv:2: end 1.0 is not after start 2.0"),
    ("m.csv", "path,speaker,dataset\na.wav,s,d,extra\n", "m.csv:2: more fields than columns"),
    ("m.csv", "path,speaker,dataset\nx/a.wav,s,d\ny/a.wav,s,d\n", "m.csv:2 and "),
    ("m.csv", "path,speaker,dataset\n", "lists no audio"),
    ("m.jsonl", '{"path": "a.wav", "speaker": "s", "dataset": "d"}\n{oops\n', "m.jsonl:2: not valid JSON"),
    ("m.json", '{"path": "a.wav"}', "expected a JSON array of objects"),
    ("m.txt", "a.wav s\n", "unknown format '.txt'"),
])
def test_manifest_errors_name_file_and_reason(tmp_path, name, text, message):
    with pytest.raises(DataError, match=None) as info:
        manifest.read_manifest(write(tmp_path / name, text))
    assert message in str(info.value)


# --- Kaldi data dirs -----------------------------------------------------------------------
def test_kaldi_dir_without_and_with_segments(tmp_path, monkeypatch):
    kd = tmp_path / "data" / "train"
    write(kd / "wav.scp", "r1 wavs/r1.wav\nr2 /abs/r2.flac\n")
    write(kd / "utt2spk", "r2 spkB\nr1 spkA\n")
    monkeypatch.chdir(tmp_path)  # Kaldi resolves relative paths against the working dir
    scan = manifest.read_kaldi_dir(kd)
    assert [(u.key, u.path, u.rel_path) for u in scan.utterances] == [
        ("train_spkA_r1", str(tmp_path / "wavs" / "r1.wav"), "wavs/r1.wav"),
        ("train_spkB_r2", "/abs/r2.flac", "/abs/r2.flac")]
    write(kd / "segments", "r1-0001 r1 0.00 1.50\nr1-0002 r1 1.5 -1\n")
    write(kd / "utt2spk", "r1-0001 spkA\nr1-0002 spkB\n")
    scan = manifest.read_kaldi_dir(kd, data_root=tmp_path / "wavs", dataset="vox")
    assert [(u.key, u.start, u.end) for u in scan.utterances] == [("vox_spkA_r1-0001", 0.0, 1.5),
                                                                   ("vox_spkB_r1-0002", 1.5, None)]
    assert scan.utterances[0].path == str(tmp_path / "wavs" / "wavs" / "r1.wav")


@pytest.mark.parametrize("files,message", [
    ({"wav.scp": "r1 sox a.wav -t wav - |\nr2 b.wav\n"}, "wav.scp:1: pipe commands"),
    ({"wav.scp": "r1 a.wav\nr1 b.wav\n"}, "wav.scp:2: 'r1' already given on line 1"),
    ({"utt2spk": "r1 s\n"}, "have no speaker"),
    ({"utt2spk": "r1 s\nr2 s\nr3 s\n"}, "'r3'"),
    ({"wav.scp": "r1 feats.ark:123\nr2 b.wav\n"}, "Kaldi ark offset"),
    ({"segments": "u1 r9 0 1\n"}, "recording 'r9' is not in"),
    ({"segments": "u1 r1 1.0 0.5\n", "utt2spk": "u1 s\n"}, "segments:1: end 0.5 is not after start 1.0"),
    ({"wav.scp": "r1\n"}, "wav.scp:1: expected 2 fields"),
])
def test_kaldi_dir_errors(tmp_path, files, message):
    contents = {"wav.scp": "r1 a.wav\nr2 b.wav\n", "utt2spk": "r1 s\nr2 s\n"}
    contents.update(files)
    for name, text in contents.items():
        write(tmp_path / "kd" / name, text)
    with pytest.raises(DataError) as info:
        manifest.read_kaldi_dir(tmp_path / "kd", data_root=tmp_path)
    assert message in str(info.value)


# --- sources, segments, RTTM ---------------------------------------------------------------
def test_source_description_and_change_detection(tmp_path):
    m = write(tmp_path / "m.csv", "path,speaker,dataset\na.wav,s,d\n")
    source = manifest.describe_source(manifest=m)
    assert source["type"] == "manifest" and source["base"] == str(tmp_path)
    assert manifest.source_changed(source, manifest.describe_source(manifest=m)) == ""
    write(m, "path,speaker,dataset\na.wav,s,d\nb.wav,s,d\n")
    assert "has changed since it was scanned" in manifest.source_changed(source, manifest.describe_source(manifest=m))
    tree = manifest.describe_source(data_root=tmp_path)
    assert "not manifest" in manifest.source_changed(tree, source)
    with pytest.raises(DataError, match="not both"):
        manifest.describe_source(manifest=m, kaldi_dir=tmp_path)
    with pytest.raises(DataError, match="a dataset name applies"):
        manifest.describe_source(data_root=tmp_path, dataset="x")
    with pytest.raises(DataError, match="has no wav.scp"):
        manifest.describe_source(kaldi_dir=tmp_path)


def test_segment_headers_and_decoding(tmp_path):
    wave = tone(3.0, rate=8000)
    path = str(write_wav(tmp_path / "r.wav", wave, rate=8000))
    utt = Utterance(key="k", dataset="d", speaker="s", utterance="u", path=path, start=0.5, end=1.25)
    read_header(utt)
    assert utt.num_samples == 6000 and abs(utt.duration - 0.75) < 1e-9
    utt = Utterance(key="k", dataset="d", speaker="s", utterance="u", path=path, start=2.5, end=9.0)
    read_header(utt)
    assert utt.num_samples == 4000  # clipped at the end of the file
    stored, _ = sf.read(path, dtype="float32")
    np.testing.assert_array_equal(load_audio(path, 8000, start=0.5, end=1.25), stored[4000:10000])
    with pytest.raises(AudioError, match="after the end of the file"):
        load_audio(path, 8000, start=4.0, end=5.0)


def test_rttm_to_manifest(tmp_path):
    write_wav(tmp_path / "audio" / "meet1.wav", tone(5.0))
    rttm = write(tmp_path / "x.rttm", "SPEAKER meet1 1 0.500 1.250 <NA> <NA> alice <NA> <NA>\n"
                                      "SPEAKER meet1 1 2.000 0.200 <NA> <NA> bob <NA> <NA>\n"
                                      "SPEAKER meet1 1 2.500 2.000 <NA> <NA> bob <NA> <NA>\n")
    count = manifest.rttm_to_manifest(rttm, tmp_path / "audio", tmp_path / "m.csv", "meet",
                                      min_duration_s=0.5, speaker_per_recording=True)
    assert count == 2
    scan = manifest.read_manifest(tmp_path / "m.csv")
    assert [(u.key, u.start, u.end) for u in scan.utterances] == [
        ("meet_meet1-alice_meet1_00000500_00001750", 0.5, 1.75),
        ("meet_meet1-bob_meet1_00002500_00004500", 2.5, 4.5)]
    with pytest.raises(DataError, match="no audio for recording 'other'"):
        manifest.rttm_to_manifest(write(tmp_path / "y.rttm", "SPEAKER other 1 0 1 <NA> <NA> a <NA> <NA>\n"),
                                  tmp_path / "audio", tmp_path / "m2.csv", "meet")


# --- end to end ----------------------------------------------------------------------------
def extract_in_process(fixtures_dir, output_dir, *source_args):
    return extract.main([*map(str, source_args), "--output_dir", str(output_dir), *map(str, tiny_model_args(fixtures_dir)),
                         "--dtype", "fp32", "--num_workers", "0", "--no_progress"])


def final_embeddings(output_dir, final_dir):
    merge.merge([output_dir], final_dir, ["pkl", "npz"])
    with np.load(final_dir / "utterance_embeddings.npz", allow_pickle=False) as data:
        return dict(zip(map(str, data["keys"]), data["embeddings"]))


@pytest.mark.slow
def test_same_audio_same_embedding_from_tree_manifest_and_kaldi_dir(tmp_path, fixtures_dir, monkeypatch):
    """Segments of a long recording (read by seeking) embed exactly like the same samples cut into files."""
    rate = 16000
    recording = write_wav(tmp_path / "recordings" / "long.wav", tone(8.0, seed=3, freq=180))
    write_wav(tmp_path / "recordings" / "other.flac", tone(1.5, seed=4, freq=260))
    pcm, _ = sf.read(str(recording), dtype="int16")
    segments = [("seg1", "spkA", 0.75, 2.5), ("seg2", "spkB", 3.1, 6.05), ("seg3", "spkA", 6.5, None)]
    for utt, spk, start, end in segments:  # the same samples as their own files, in a tree
        first, last = int(round(start * rate)), None if end is None else int(round(end * rate))
        write_wav(tmp_path / "tree" / "corpus" / spk / f"{utt}.wav", pcm[first:last], subtype="PCM_16")
    (tmp_path / "tree" / "corpus" / "spkC").mkdir()
    shutil.copy(tmp_path / "recordings" / "other.flac", tmp_path / "tree" / "corpus" / "spkC" / "other.flac")
    write(tmp_path / "lists" / "m.csv", "path,speaker,dataset,utterance,start,end\n" + "".join(
        f"recordings/long.wav,{spk},corpus,{utt},{start},{'' if end is None else end}\n"
        for utt, spk, start, end in segments) + "recordings/other.flac,spkC,corpus,,,\n")
    kd = tmp_path / "kaldi" / "corpus"
    write(kd / "wav.scp", "long recordings/long.wav\nother recordings/other.flac\n")
    write(kd / "segments", "".join(f"{u} long {s} {-1 if e is None else e}\n" for u, _, s, e in segments)
          + "other other 0 -1\n")
    write(kd / "utt2spk", "".join(f"{u} {spk}\n" for u, spk, _, _ in segments) + "other spkC\n")

    assert extract_in_process(fixtures_dir, tmp_path / "o_tree", "--data_root", tmp_path / "tree") == 0
    assert extract_in_process(fixtures_dir, tmp_path / "o_man", "--manifest", tmp_path / "lists" / "m.csv",
                              "--data_root", tmp_path) == 0
    monkeypatch.chdir(tmp_path)
    assert extract_in_process(fixtures_dir, tmp_path / "o_kaldi", "--kaldi_dir", kd) == 0
    tree = final_embeddings(tmp_path / "o_tree", tmp_path / "f_tree")
    man = final_embeddings(tmp_path / "o_man", tmp_path / "f_man")
    kaldi = final_embeddings(tmp_path / "o_kaldi", tmp_path / "f_kaldi")
    assert sorted(tree) == sorted(man) == sorted(kaldi) == [
        "corpus_spkA_seg1", "corpus_spkA_seg3", "corpus_spkB_seg2", "corpus_spkC_other"]
    for key in tree:
        np.testing.assert_allclose(man[key], tree[key], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(kaldi[key], tree[key], rtol=1e-5, atol=1e-6)
    utt_list = json.loads((tmp_path / "f_man" / "utterance_list.json").read_text())
    seg2 = next(u for u in utt_list if u["key"] == "corpus_spkB_seg2")
    assert (seg2["start"], seg2["end"], seg2["rel_path"]) == (3.1, 6.05, "recordings/long.wav")
    assert abs(seg2["duration"] - 2.95) < 1e-3
    summary = json.loads((tmp_path / "f_kaldi" / "summary.json").read_text())
    assert summary["runs"][0]["source"]["type"] == "kaldi"

    # resuming checks the source: an edited manifest, or another input, is refused (exit 2)
    with open(tmp_path / "lists" / "m.csv", "a") as handle:
        handle.write("recordings/other.flac,spkD,corpus,again,,\n")
    assert extract_in_process(fixtures_dir, tmp_path / "o_man", "--manifest", tmp_path / "lists" / "m.csv",
                              "--data_root", tmp_path) == 2
    assert extract_in_process(fixtures_dir, tmp_path / "o_man", "--data_root", tmp_path / "tree") == 2
    # a second run over the unchanged tree is complete already
    assert extract_in_process(fixtures_dir, tmp_path / "o_tree", "--data_root", tmp_path / "tree") == 0


def test_input_arguments_are_checked(tmp_path, fixtures_dir, capsys):
    write(tmp_path / "m.csv", "path,speaker,dataset\na.wav,s,d\n")
    write(tmp_path / "kd" / "wav.scp", "r1 flac -d -c a.flac |\n")
    write(tmp_path / "kd" / "utt2spk", "r1 s\n")
    cases = [(["--manifest", tmp_path / "m.csv", "--kaldi_dir", tmp_path / "kd"], "exactly one input"),
             ([], "exactly one input"),
             (["--manifest", tmp_path / "nope.csv"], "is not a file"),
             (["--data_root", tmp_path, "--dataset", "x"], "a dataset name applies"),
             (["--kaldi_dir", tmp_path / "kd"], "pipe commands")]
    for args, message in cases:
        assert extract_in_process(fixtures_dir, tmp_path / "out", *args) == 2
        err = capsys.readouterr().err
        assert f"error: " in err and message in err, (args, err)
