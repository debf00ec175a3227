"""End to end: per-speaker statistics, outliers, closest pairs, the report, self-describing outputs."""
import json
import shutil
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, extract_cmd, load_final, merge_cmd, run_cli, tiny_model_args, tone, write_wav


def load(final_dir):
    utts, spks, summary = load_final(final_dir)
    spk_list = {r["key"]: r for r in json.loads((final_dir / "speaker_list.json").read_text())}
    return utts, spks, summary, spk_list


def unit(rows):
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


# --- real CAM++ on real speech --------------------------------------------------------------
MISLABELLED = "dsA_speaker90_seg03"  # speaker91's seg03, copied into speaker90's folder


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, fixtures_dir):
    """dsA: speaker90 (+ one speaker91 segment), speaker91; dsB: spkX = a copy of speaker90's folder."""
    sample = fixtures_dir / "campplus_sample" / "data" / "pyannote_sample"
    root = tmp_path_factory.mktemp("corpus")
    shutil.copytree(sample / "speaker90", root / "dsA" / "speaker90")
    shutil.copytree(sample / "speaker91", root / "dsA" / "speaker91")
    shutil.copytree(sample / "speaker90", root / "dsB" / "spkX")
    shutil.copy(sample / "speaker91" / "seg03.wav", root / "dsA" / "speaker90" / "seg03.wav")
    out = tmp_path_factory.mktemp("real")
    r = run_cli(extract_cmd(root, out / "tmp", "--dtype", "fp32"))
    assert r.returncode == 0, r.stderr[-3000:]
    for rule in ("plain", "normalized"):
        r = run_cli(merge_cmd(out / "tmp", out / rule, "--speaker_mean", rule))
        assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["plain", "normalized"])
def test_mislabelled_utterance_is_the_only_outlier(real_run, rule):
    _, spks, summary, spk_list = load(real_run / rule)
    assert spks["dsA_speaker90"]["outliers"] == [MISLABELLED]
    assert spks["dsA_speaker91"]["outliers"] == [] and spks["dsB_spkX"]["outliers"] == []
    assert spk_list["dsA_speaker90"]["outliers"] == [MISLABELLED]
    assert summary["speaker_statistics"]["speakers_with_outliers"] == 1
    assert summary["speaker_statistics"]["outlier_utterances"] == 1
    assert summary["speaker_statistics"]["speakers_with_fewer_than_2_utterances"] == 0
    assert summary["speaker_mean"]["rule"] == rule


@pytest.mark.slow
def test_same_voice_in_two_folders_heads_closest_pairs(real_run):
    _, _, summary, _ = load(real_run / "plain")
    pairs = summary["closest_speaker_pairs"]
    assert pairs[0][:2] == ["dsA_speaker90", "dsB_spkX"] and pairs[0][2] > 0.9
    assert len(pairs) == 3 and [p[2] for p in pairs] == sorted((p[2] for p in pairs), reverse=True)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["plain", "normalized"])
def test_written_statistics_match_numpy(real_run, rule):
    utts, spks, summary, spk_list = load(real_run / rule)
    utt_list = {r["key"]: r for r in json.loads((real_run / rule / "utterance_list.json").read_text())}
    for spk_key, spk in spks.items():
        members = sorted(k for k in utts if k.startswith(spk_key + "_"))
        rows = np.stack([utts[k]["embedding"] for k in members]).astype(np.float64)
        mean = (unit(rows) if rule == "normalized" else rows).mean(0)
        np.testing.assert_allclose(spk["embedding"], mean, rtol=1e-5, atol=1e-6)
        cosines = unit(rows) @ unit(mean)
        assert spk["mean_cosine"] == pytest.approx(cosines.mean(), abs=1e-4)
        assert spk["min_cosine"] == pytest.approx(cosines.min(), abs=1e-4)
        assert spk["duration_s"] == pytest.approx(sum(utt_list[k]["duration"] for k in members), abs=1e-2)
        for key, cos in zip(members, cosines):
            assert utt_list[key]["speaker_cosine"] == pytest.approx(cos, abs=1e-4)
        for field in ("num_utterances", "duration_s", "mean_cosine", "min_cosine", "outliers"):
            assert spk[field] == spk_list[spk_key][field]
    names = sorted(spks)
    centroids = unit(np.stack([spks[n]["embedding"] for n in names]))
    sims = centroids @ centroids.T
    brute = sorted(((names[i], names[j], sims[i, j]) for i in range(len(names)) for j in range(i + 1, len(names))),
                   key=lambda p: -p[2])
    assert [p[:2] for p in summary["closest_speaker_pairs"]] == [list(p[:2]) for p in brute]
    for got, want in zip(summary["closest_speaker_pairs"], brute):
        assert got[2] == pytest.approx(want[2], abs=1e-4)


@pytest.mark.slow
def test_report_names_outlier_and_pair(real_run):
    r = run_cli([sys.executable, "-m", "speakerlab.report", real_run / "plain"])
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "13 utterances, 3 speakers" in text
    assert MISLABELLED in text and "dsA_speaker90 (1 of 5)" in text
    pair_line = next(line for line in text.splitlines() if "dsB_spkX" in line and "dsA_speaker90" in line)
    assert pair_line.split()[0].startswith("0.9")
    assert "campplus" in text and "fp32" in text


def test_report_refuses_a_non_final_dir(tmp_path):
    r = run_cli([sys.executable, "-m", "speakerlab.report", tmp_path])
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "complete.json is missing" in r.stderr
    assert "Traceback" not in r.stderr


# --- self-describing outputs with tiny models -----------------------------------------------
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, fixtures_dir):
    """Two datasets extracted separately: (campplus_tiny, fp32), (campplus_tiny, bf16),
    (eres2net_tiny, fp32) on dataset one; (campplus_tiny, fp32) on dataset two."""
    base = tmp_path_factory.mktemp("tiny")
    for name, seeds in (("one", (1, 2, 3)), ("two", (4, 5, 6))):
        for n, seed in enumerate(seeds):
            write_wav(base / name / f"ds_{name}" / f"spk{n % 2}" / f"u{seed}.wav", tone(1.0 + 0.3 * n, seed=seed,
                                                                                      freq=180 + 40 * n))
    runs = {}
    for label, data, model, dtype in (("fp32", "one", "campplus_tiny", "fp32"), ("bf16", "one", "campplus_tiny", "bf16"),
                                      ("eres2net", "one", "eres2net_tiny", "fp32"),
                                      ("two", "two", "campplus_tiny", "fp32")):
        out = base / "runs" / label
        r = run_cli(extract_cmd(base / data, out, *tiny_model_args(fixtures_dir, model), "--dtype", dtype))
        assert r.returncode == 0, r.stderr[-3000:]
        runs[label] = out
    return base, runs


@pytest.mark.slow
def test_differently_made_outputs_are_told_apart(tiny_runs):
    base, runs = tiny_runs
    for label in ("fp32", "bf16", "eres2net"):
        r = run_cli(merge_cmd(runs[label], base / "final" / label))
        assert r.returncode == 0, r.stderr
    summaries = {label: json.loads((base / "final" / label / "summary.json").read_text())
                 for label in ("fp32", "bf16", "eres2net")}
    assert summaries["fp32"]["dtype"] == "fp32" and summaries["bf16"]["dtype"] == "bf16"
    assert summaries["fp32"]["model"]["sha256"] == summaries["bf16"]["model"]["sha256"]
    assert summaries["fp32"]["model"]["sha256"] != summaries["eres2net"]["model"]["sha256"]
    assert summaries["eres2net"]["embedding_dimension"] == 512
    for summary in summaries.values():
        run = summary["runs"][0]
        assert summary["features"]["sample_rate"] == 16000 and summary["features"]["num_mel_bins"] == 80
        assert "mean_norm" in summary["features"] and summary["model"]["config"]
        assert run["command"] and run["started"] <= run["finished"] and run["world_size"] == 1
        assert run["versions"] and run["batch_policy"] and summary["merge_command"]
        assert "speaker_statistics" in summary and "closest_speaker_pairs" in summary


def merge_many(inputs, output_dir):
    return run_cli([sys.executable, ROOT / "merge_embeddings.py", "--input_dir", *inputs, "--output_dir", output_dir])


@pytest.mark.slow
def test_merge_refuses_runs_made_differently(tiny_runs, tmp_path):
    _, runs = tiny_runs
    r = merge_many([runs["two"], runs["eres2net"]], tmp_path / "a")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "model_sha256" in r.stderr and str(runs["eres2net"]) in r.stderr
    assert not (tmp_path / "a" / "summary.json").exists()
    r = merge_many([runs["two"], runs["bf16"]], tmp_path / "b")
    assert r.returncode == 2 and "dtype" in r.stderr and "model_sha256" not in r.stderr
    r = merge_many([runs["fp32"], runs["two"]], tmp_path / "c")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert len(summary["runs"]) == 2 and sorted(summary["datasets"]) == ["ds_one", "ds_two"]
    assert summary["total_speakers"] == 4 and summary["total_utterances"] == 6
