"""End to end: tree -> extract (1 and 2 ranks) -> merge -> final files."""
import json
import sys

import numpy as np
import pytest

from tests.helpers import extract_cmd, load_final, merge_cmd, run_cli, tiny_model_args, tone, write_wav


def make_tree(root):
    # 2 datasets, 3 speakers, mixed lengths, a deeper VoxCeleb-style level and a 44.1 kHz stereo file
    write_wav(root / "dsA" / "spk1" / "u1.wav", tone(1.2, seed=1))
    write_wav(root / "dsA" / "spk1" / "u2.wav", tone(2.5, seed=2, freq=200))
    write_wav(root / "dsA" / "spk1" / "video9" / "00001.wav", tone(0.8, seed=3))
    write_wav(root / "dsA" / "spk2" / "u1.flac", tone(3.1, seed=4, freq=300))
    write_wav(root / "dsB" / "spk3" / "x.wav", tone(1.7, rate=44100, seed=5, channels=2), rate=44100)
    write_wav(root / "dsB" / "spk3" / "y.wav", tone(0.6, seed=6, freq=310))
    (root / "dsB" / "readme.txt").write_text("not audio")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def one_rank(tree, tmp_path_factory, fixtures_dir):
    out = tmp_path_factory.mktemp("one")
    r = run_cli(extract_cmd(tree, out / "tmp", *tiny_model_args(fixtures_dir), "--dtype", "fp32"))
    assert r.returncode == 0, r.stderr
    r = run_cli(merge_cmd(out / "tmp", out / "final", "--formats", "pkl,npz,kaldi"))
    assert r.returncode == 0, r.stderr
    return out


def test_final_schema(one_rank):
    utts, spks, summary = load_final(one_rank / "final")
    assert sorted(utts) == ["dsA_spk1_u1", "dsA_spk1_u2", "dsA_spk1_video9_00001", "dsA_spk2_u1",
                            "dsB_spk3_x", "dsB_spk3_y"]
    entry = utts["dsA_spk1_video9_00001"]
    assert set(entry) == {"embedding", "dataset", "speaker_id", "utterance_id", "path"}
    assert entry["dataset"] == "dsA" and entry["speaker_id"] == "spk1" and entry["utterance_id"] == "video9_00001"
    assert entry["embedding"].dtype == np.float32 and entry["embedding"].shape == (192,)
    assert set(spks) == {"dsA_spk1", "dsA_spk2", "dsB_spk3"}
    assert spks["dsA_spk1"]["num_utterances"] == 3
    assert {"embedding", "dataset", "speaker_id", "num_utterances"} <= set(spks["dsA_spk1"])
    assert summary["total_utterances"] == 6 and summary["total_speakers"] == 3
    assert summary["embedding_dimension"] == 192 and summary["failures"] == 0
    assert summary["datasets"]["dsA"]["utterances"] == 4 and summary["datasets"]["dsB"]["speakers"] == 1
    assert summary["ignored_files"] == {"not an audio extension": 1}
    assert summary["model"]["sha256"] and summary["features"]["num_mel_bins"] == 80
    utt_list = json.loads((one_rank / "final" / "utterance_list.json").read_text())
    x = next(u for u in utt_list if u["key"] == "dsB_spk3_x")
    assert x["sample_rate"] == 44100 and abs(x["duration"] - 1.7) < 0.01
    assert json.loads((one_rank / "final" / "failures.json").read_text()) == []


def test_speaker_embedding_is_mean_of_utterances(one_rank):
    utts, spks, _ = load_final(one_rank / "final")
    for spk_key, spk in spks.items():
        members = [u["embedding"] for k, u in utts.items() if k.startswith(spk_key + "_")]
        assert len(members) == spk["num_utterances"]
        np.testing.assert_allclose(spk["embedding"], np.mean(members, axis=0), rtol=1e-5, atol=1e-6)


def test_npz_and_kaldi_equal_pickle(one_rank):
    import kaldiio
    utts, spks, _ = load_final(one_rank / "final")
    with np.load(one_rank / "final" / "utterance_embeddings.npz", allow_pickle=False) as data:
        for key, row in zip(data["keys"], data["embeddings"]):
            np.testing.assert_array_equal(row, utts[str(key)]["embedding"])
    ark = kaldiio.load_scp(str(one_rank / "final" / "xvector.scp"))
    for key in utts:
        np.testing.assert_array_equal(ark[key], utts[key]["embedding"])
    spk_ark = kaldiio.load_scp(str(one_rank / "final" / "spk_xvector.scp"))
    for key in spks:
        np.testing.assert_array_equal(spk_ark[key], spks[key]["embedding"])


def test_embeddings_match_direct_model_call(one_rank, tree, fixtures_dir):
    """The pipeline's batched numbers equal one file at a time through fbank + model."""
    import soundfile as sf
    import soxr
    import torch
    from speakerlab.config import load_config
    from speakerlab.features import Fbank
    from speakerlab.models import load_model
    utts, _, _ = load_final(one_rank / "final")
    config = load_config(fixtures_dir / "campplus_tiny" / "config.yaml")
    model = load_model(config, fixtures_dir / "campplus_tiny" / "model.ckpt")
    fbank = Fbank()
    for key, entry in utts.items():
        wave, rate = sf.read(entry["path"], dtype="float32", always_2d=True)
        wave = wave[:, 0]
        if rate != 16000:
            wave = soxr.resample(wave, rate, 16000, quality="HQ")
        feats, _ = fbank(torch.from_numpy(np.ascontiguousarray(wave)))
        with torch.no_grad():
            ref = model(feats).numpy()[0]
        cos = ref @ entry["embedding"] / np.linalg.norm(ref) / np.linalg.norm(entry["embedding"])
        assert cos >= 0.9999, (key, cos)


@pytest.mark.slow
def test_two_ranks_equal_one(one_rank, tree, tmp_path, fixtures_dir):
    out = tmp_path
    r = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 *extract_cmd(tree, out / "tmp", *tiny_model_args(fixtures_dir),
                                                        "--dtype", "fp32")[1:]])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "tmp" / "rank_00").is_dir() and (out / "tmp" / "rank_01").is_dir()
    r = run_cli(merge_cmd(out / "tmp", out / "final"))
    assert r.returncode == 0, r.stderr
    utts1, spks1, _ = load_final(one_rank / "final")
    utts2, spks2, summary2 = load_final(out / "final")
    assert sorted(utts1) == sorted(utts2) and sorted(spks1) == sorted(spks2)
    for key in utts1:
        np.testing.assert_allclose(utts1[key]["embedding"], utts2[key]["embedding"], rtol=1e-4, atol=1e-5)
    for key in spks1:
        np.testing.assert_allclose(spks1[key]["embedding"], spks2[key]["embedding"], rtol=1e-4, atol=1e-5)
    assert summary2["runs"][0]["world_size"] == 2


@pytest.mark.slow
def test_reference_embeddings_with_default_model(tmp_path, fixtures_dir):
    """The real CAM++ checkpoint on real speech reproduces 3D-Speaker's embeddings."""
    data = fixtures_dir / "campplus_sample" / "data"
    r = run_cli(extract_cmd(data, tmp_path / "tmp", "--dtype", "fp32"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(merge_cmd(tmp_path / "tmp", tmp_path / "final"))
    assert r.returncode == 0, r.stderr
    utts, _, summary = load_final(tmp_path / "final")
    expected = np.load(fixtures_dir / "campplus_sample" / "expected.npz")
    assert sorted(utts) == sorted(expected.files)
    for key in expected.files:
        a, b = utts[key]["embedding"], expected[key]
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.9999, key
    assert summary["model"]["sha256"] == "92f29b94e6948786a26778c9e302525d185bb08c8b9f5252ed98776902840199"


def test_unfused_run_gives_the_same_embeddings(tree, one_rank, tmp_path, fixtures_dir):
    """--no_fusion runs conv, BatchNorm and activation separately, as the reference does."""
    r = run_cli(extract_cmd(tree, tmp_path / "tmp", *tiny_model_args(fixtures_dir), "--dtype", "fp32",
                            "--no_fusion"))
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "tmp" / "rank_00" / "metadata.json").read_text())
    assert meta["batch_policy"]["fused"] is False
    fused = np.load(one_rank / "tmp" / "rank_00" / "embeddings.npz")
    plain = np.load(tmp_path / "tmp" / "rank_00" / "embeddings.npz")
    assert list(fused["keys"]) == list(plain["keys"])
    a, b = fused["embeddings"], plain["embeddings"]
    assert np.abs(a - b).max() <= 2e-5 * np.abs(b).max()
