"""The Python API: model embeddings equal the pipeline's, EmbeddingSet lookups, rankings and subsets."""
import pickle

import numpy as np
import pytest
import soundfile as sf

import speakerlab
from speakerlab.api import EmbeddingSet
from speakerlab.audio import AudioError
from tests.helpers import extract_cmd, merge_cmd, run_cli, tiny_model_args, tone, write_wav


def make_tree(root):
    # 2 datasets, 3 speakers (one with 3 utterances), a 44.1 kHz stereo file and a FLAC
    write_wav(root / "dsA" / "spk1" / "u1.wav", tone(1.2, seed=1))
    write_wav(root / "dsA" / "spk1" / "u2.wav", tone(2.5, seed=2, freq=200))
    write_wav(root / "dsA" / "spk1" / "u3.flac", tone(0.9, seed=3, freq=210))
    write_wav(root / "dsA" / "spk2" / "u1.wav", tone(3.1, seed=4, freq=300))
    write_wav(root / "dsB" / "spk3" / "x.wav", tone(1.7, rate=44100, seed=5, channels=2), rate=44100)
    write_wav(root / "dsB" / "spk3" / "y.wav", tone(0.6, seed=6, freq=310))
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory, fixtures_dir):
    """The pipeline with its default (auto) precision, as a user would run it."""
    out = tmp_path_factory.mktemp("api")
    tree = make_tree(out / "data")
    r = run_cli(extract_cmd(tree, out / "tmp", *tiny_model_args(fixtures_dir)))
    assert r.returncode == 0, r.stderr
    r = run_cli(merge_cmd(out / "tmp", out / "final", "--formats", "pkl,npz"))
    assert r.returncode == 0, r.stderr
    with open(out / "final" / "utterance_embeddings.pkl", "rb") as handle:
        utts = pickle.load(handle)
    return out, utts


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    return speakerlab.load_model(fixtures_dir / "campplus_tiny" / "model.ckpt",
                                 fixtures_dir / "campplus_tiny" / "config.yaml", device="cpu")


def cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_package_import_is_light():
    r = run_cli(["python", "-c", "import sys, speakerlab; assert 'torch' not in sys.modules; "
                 "print(speakerlab.load_embeddings.__name__)"])
    assert r.returncode == 0 and r.stdout.strip() == "load_embeddings", r.stderr


def test_api_embedding_equals_pipeline(run, tiny):
    """Same decode, same fbank, same model, same default dtype: the pipeline's numbers."""
    out, utts = run
    keys = sorted(utts)
    import json
    from speakerlab.rundir import RunDir
    engine = RunDir(out / "tmp").read_metadata(0)["engine"]
    assert (tiny.backend, tiny.dtype) == (engine["backend"], engine["dtype"])  # one policy, one choice
    assert json.loads((out / "final" / "summary.json").read_text())["runs"][0]["engine"] == engine
    batch = tiny.embed([utts[k]["path"] for k in keys])
    assert batch.shape == (len(keys), 192) and batch.dtype == np.float32
    for key, row in zip(keys, batch):
        np.testing.assert_allclose(row, utts[key]["embedding"], rtol=1e-4, atol=1e-5)
    single = tiny.embed(utts["dsB_spk3_x"]["path"])  # alone, not in a batch: padding-invisible
    assert single.shape == (192,)
    assert cos(single, utts["dsB_spk3_x"]["embedding"]) >= 0.999


def test_fp32_single_equals_batch_and_arrays(run, fixtures_dir):
    out, utts = run
    model = speakerlab.load_model(fixtures_dir / "campplus_tiny" / "model.ckpt",
                                  fixtures_dir / "campplus_tiny" / "config.yaml", device="cpu", dtype="fp32")
    keys = sorted(utts)
    paths = [utts[k]["path"] for k in keys]
    batch = model.embed(paths)
    for key in ("dsA_spk1_u2", "dsB_spk3_x"):  # 16 kHz mono; 44.1 kHz stereo
        path, row = utts[key]["path"], batch[keys.index(key)]
        assert cos(model.embed(path), row) >= 0.99999
        data, rate = sf.read(path, dtype="int16", always_2d=True)
        from_int = model.embed(data, sample_rate=rate)            # (samples, channels) int16
        from_float = model.embed((data.T.astype(np.float32) / 32768.0, rate))  # (channels, samples) float
        np.testing.assert_allclose(from_int, row, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(from_float, row, rtol=1e-4, atol=1e-5)
    assert model.compare(paths[0], paths[0]) == pytest.approx(1.0, abs=1e-6)
    assert -1.0 <= model.compare(paths[0], paths[3]) < 0.9999


def test_embed_errors_name_the_input(run, tiny, tmp_path):
    _, utts = run
    good = utts[sorted(utts)[0]]["path"]
    with pytest.raises(ValueError, match="sample rate"):
        tiny.embed(np.ones(16000, np.float32))
    with pytest.raises(AudioError, match="all samples are zero"):
        tiny.embed(np.zeros(16000, np.float32), sample_rate=16000)
    with pytest.raises(AudioError, match="too short"):
        tiny.embed(tone(0.01), sample_rate=16000)
    missing = tmp_path / "missing.wav"
    with pytest.raises(AudioError) as info:
        tiny.embed([good, missing])
    assert info.value.path == str(missing) and info.value.stage == "decode"
    rows = tiny.embed([good, missing, (np.zeros(800, np.float32), 16000)], on_error="nan")
    assert np.isfinite(rows[0]).all() and np.isnan(rows[1]).all() and np.isnan(rows[2]).all()


def test_load_embeddings_npz_and_pickle_agree(run, tmp_path):
    out, utts = run
    emb = speakerlab.load_embeddings(out / "final")
    assert emb.keys == sorted(utts) and len(emb) == 6 and emb.dim == 192
    assert emb.datasets == ["dsA", "dsB"]
    assert emb.speaker_keys == ["dsA_spk1", "dsA_spk2", "dsB_spk3"]
    record = emb.utterances["dsA_spk1_u3"]
    assert record["dataset"] == "dsA" and record["speaker_id"] == "spk1" and record["speaker_key"] == "dsA_spk1"
    assert record["utterance_id"] == "u3" and record["path"].endswith("u3.flac")
    np.testing.assert_array_equal(record["embedding"], utts["dsA_spk1_u3"]["embedding"])
    assert emb.speakers["dsA_spk1"]["num_utterances"] == 3
    keys, matrix = emb.matrix()
    assert keys == emb.keys and matrix.shape == (6, 192)
    spk_keys, spk_matrix = emb.matrix("speaker", normalize=True)
    np.testing.assert_allclose(np.linalg.norm(spk_matrix, axis=1), 1.0, rtol=1e-5)
    # merged without the npz files: the pickles give the same set, but only when allowed
    copy = tmp_path / "final"
    r = run_cli(merge_cmd(out / "tmp", copy, "--formats", "pkl"))
    assert r.returncode == 0, r.stderr
    with pytest.raises(ValueError, match="only as a pickle .*allow_pickle=True"):
        speakerlab.load_embeddings(copy)
    again = speakerlab.load_embeddings(copy, allow_pickle=True)
    assert again.keys == emb.keys and again.speaker_keys == emb.speaker_keys
    np.testing.assert_array_equal(again.matrix()[1], matrix)
    assert again.utterances["dsB_spk3_x"]["speaker_key"] == "dsB_spk3"
    with pytest.raises(FileNotFoundError):
        speakerlab.load_embeddings(tmp_path / "nothing")


def test_similar_ranks_by_cosine_and_filters(run):
    out, utts = run
    emb = speakerlab.load_embeddings(out / "final")
    query = "dsA_spk1_u1"
    q = utts[query]["embedding"]
    expected = sorted(((cos(q, e["embedding"]), k) for k, e in utts.items() if k != query), reverse=True)
    result = emb.similar(query, k=10)
    assert [m.key for m in result] == [k for _, k in expected]
    assert [m.score for m in result] == pytest.approx([s for s, _ in expected], abs=1e-5)
    same = emb.similar(query, k=10, same_speaker=True)
    assert [m.key for m in same] == [k for _, k in expected if k.startswith("dsA_spk1_")]
    other = emb.similar(query, k=2, same_speaker=False)
    assert [m.key for m in other] == [k for _, k in expected if not k.startswith("dsA_spk1_")][:2]
    # by path (absolute or relative to the data root) and by vector
    assert emb.similar(utts[query]["path"], k=10) == result
    assert emb.similar("dsA/spk1/u1.wav", k=3, same_speaker=True) == same[:3]
    by_vector = emb.similar(q, k=3)
    assert by_vector[0].key == query and by_vector[0].score == pytest.approx(1.0, abs=1e-5)
    assert [m.key for m in by_vector[1:]] == [k for _, k in expected[:2]]
    with pytest.raises(ValueError, match="same_speaker"):
        emb.similar(q, same_speaker=True)
    with pytest.raises(KeyError):
        emb.similar("no_such_key")
    speakers = emb.similar_speakers("dsA_spk1", k=5)
    assert [m.key for m in speakers] and "dsA_spk1" not in [m.key for m in speakers]
    keys, sims = emb.speaker_similarity()
    assert sims.shape == (3, 3) and np.allclose(np.diag(sims), 1.0, atol=1e-5)


def test_similar_on_known_vectors():
    keys = ["d_a_1", "d_a_2", "d_b_1", "d_b_2"]
    matrix = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0.5, 0.5, 0]], np.float32)
    records = [{"dataset": "d", "speaker_id": k[2], "speaker_key": k[:3], "utterance_id": k[4:], "path": k}
               for k in keys]
    spk = [{"dataset": "d", "speaker_id": s, "num_utterances": 2} for s in "ab"]
    emb = EmbeddingSet(keys, matrix, records, ["d_a", "d_b"], np.array([[1, 0.05, 0], [0.25, 0.75, 0]]), spk)
    assert [m.key for m in emb.similar("d_a_1", k=3)] == ["d_a_2", "d_b_2", "d_b_1"]
    assert [m.key for m in emb.similar("d_a_1", k=3, same_speaker=False)] == ["d_b_2", "d_b_1"]
    assert [m.key for m in emb.similar("d_b", k=4, same_speaker=True)] == ["d_b_1", "d_b_2"]
    assert emb.similar("d_a_1", k=0) == []
    assert emb.score("d_a_1", "d_b_1") == pytest.approx(0.0)


def test_by_dataset_and_by_speaker(run):
    out, _ = run
    emb = speakerlab.load_embeddings(out / "final")
    a = emb.by_dataset("dsA")
    assert a.keys == ["dsA_spk1_u1", "dsA_spk1_u2", "dsA_spk1_u3", "dsA_spk2_u1"]
    assert a.speaker_keys == ["dsA_spk1", "dsA_spk2"] and a.datasets == ["dsA"]
    np.testing.assert_array_equal(a.utterances["dsA_spk2_u1"]["embedding"], emb.utterances["dsA_spk2_u1"]["embedding"])
    assert [m.key for m in a.similar("dsA_spk1_u1", k=10)] == \
        [m.key for m in emb.similar("dsA_spk1_u1", k=10) if m.key.startswith("dsA_")]
    assert emb.by_dataset("dsA", "dsB").keys == emb.keys
    assert emb.by_speaker("dsB_spk3").keys == ["dsB_spk3_x", "dsB_spk3_y"]
    assert emb.by_speaker("spk1").keys == ["dsA_spk1_u1", "dsA_spk1_u2", "dsA_spk1_u3"]
    with pytest.raises(KeyError, match="spk1"):
        emb.by_speaker("spk1", dataset="dsB")
    with pytest.raises(KeyError, match="datasets: dsA, dsB"):
        emb.by_dataset("dsC")
    assert len(emb.filter(lambda r: r["duration"] > 2.0)) == 2


@pytest.mark.slow
def test_default_model_reproduces_reference(fixtures_dir):
    """load_model() with no arguments is the embedded CAM++ model: 3D-Speaker's numbers (fp32)."""
    model = speakerlab.load_model(device="cpu", dtype="fp32")
    expected = np.load(fixtures_dir / "campplus_sample" / "expected.npz")
    data = fixtures_dir / "campplus_sample" / "data" / "pyannote_sample"
    keys = sorted(expected.files)
    paths = [data / k.split("_")[2] / (k.split("_")[3] + ".wav") for k in keys]
    for key, row in zip(keys, model.embed(paths)):
        assert cos(row, expected[key]) >= 0.9999, key
