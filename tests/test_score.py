"""Trial scoring: EER / minDCF against scikit-learn, trial formats, lookups, mean subtraction, AS-norm."""
import json
import logging

import numpy as np
import pytest
from scipy.interpolate import interp1d
from scipy.optimize import brentq
from sklearn.metrics import roc_curve

from speakerlab import finaldir, score
from speakerlab.merge import speaker_means


# --- metrics against an independent computation --------------------------------------------
def sklearn_eer(scores, labels):
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return 100.0 * brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)


def sklearn_min_dcf(scores, labels, p):
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(np.min(p * (1 - tpr) + (1 - p) * fpr) / min(p, 1 - p))


@pytest.mark.parametrize("decimals", [None, 2])  # continuous scores, and heavily tied ones
def test_eer_and_min_dcf_match_sklearn(decimals):
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(3000, int), np.zeros(12000, int)]
    scores = np.r_[rng.normal(0.6, 0.15, 3000), rng.normal(0.1, 0.15, 12000)]
    if decimals is not None:
        scores = np.round(scores, decimals)
    order = rng.permutation(len(labels))
    scores, labels = scores[order], labels[order]
    assert score.compute_eer(scores, labels) == pytest.approx(sklearn_eer(scores, labels), abs=1e-6)
    for p in (0.01, 0.05, 0.5):
        assert score.compute_min_dcf(scores, labels, p) == pytest.approx(sklearn_min_dcf(scores, labels, p), abs=1e-9)


def test_metrics_on_hand_worked_cases():
    # T .9, N .8, T .7, N .6: at threshold .8, P_fa = P_miss = 0.5
    assert score.compute_eer([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(50.0)
    assert score.compute_eer([0.9, 0.1], [1, 0]) == pytest.approx(0.0)
    assert score.compute_eer([0.1, 0.9], [1, 0]) == pytest.approx(100.0)
    # minDCF(0.01): reject all costs p * 1 = 0.01 -> normalised 1.0; perfect separation -> 0
    assert score.compute_min_dcf([0.1, 0.9], [1, 0], 0.01) == pytest.approx(1.0)
    assert score.compute_min_dcf([0.9, 0.1, 0.2], [1, 0, 0], 0.01) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="target and one nontarget"):
        score.compute_eer([0.1, 0.2], [1, 1])


# --- trials --------------------------------------------------------------------------------
def test_trial_formats(tmp_path):
    kaldi = tmp_path / "kaldi.txt"
    kaldi.write_text("# comment\nA B target\n\nA C nontarget\n")
    vox = tmp_path / "vox.txt"
    vox.write_text("1 A B\n0 A C\n")
    for path in (kaldi, vox):
        assert [(t.enroll, t.test, t.label) for t in score.read_trials(path)] == [("A", "B", 1), ("A", "C", 0)]
    assert score.read_trials(kaldi)[1].line == 4
    plain = tmp_path / "plain.txt"
    plain.write_text("A B\n")
    assert score.read_trials(plain)[0].label is None
    bad = tmp_path / "bad.txt"
    bad.write_text("A B target\nA B C D\n")
    with pytest.raises(score.ScoreError, match=r"bad.txt:2: expected"):
        score.read_trials(bad)
    bad.write_text("A B target\nA B\n")
    with pytest.raises(score.ScoreError, match=r"bad.txt:2: has no label"):
        score.read_trials(bad)
    bad.write_text("\n# nothing\n")
    with pytest.raises(score.ScoreError, match="holds no trials"):
        score.read_trials(bad)


# --- a merged dir made with the real writers -----------------------------------------------
def make_final(out, keys, matrix, records, failures=(), data_root="/data", write_npz=True):
    speakers = sorted({r["speaker_key"] for r in records})
    index = np.array([speakers.index(r["speaker_key"]) for r in records])
    spk_matrix = speaker_means(matrix, index, len(speakers), "plain")
    spk_list = [{"key": s, "dataset": s.split("_")[0], "speaker_id": s.split("_", 1)[1],
                 "num_utterances": int((index == i).sum())} for i, s in enumerate(speakers)]
    summary = {"runs": [{"data_root": data_root}]}
    out.mkdir(parents=True, exist_ok=True)
    finaldir.write(out, ["pkl", "npz"] if write_npz else ["pkl"], keys, matrix, records, speakers, spk_matrix,
                   spk_list, list(failures), summary)
    return out


def record(key, dataset, speaker, rel, start=None):
    entry = {"key": key, "dataset": dataset, "speaker_id": speaker, "speaker_key": f"{dataset}_{speaker}",
             "utterance_id": key.split("_", 2)[2], "path": f"/data/{rel}", "rel_path": rel}
    if start is not None:
        entry.update({"start": start, "end": start + 1})
    return entry


@pytest.fixture()
def final(tmp_path):
    rng = np.random.default_rng(1)
    records = [record("vox_id1_v1_00001", "vox", "id1", "vox/id1/v1/00001.wav"),
               record("vox_id1_v2_00001", "vox", "id1", "vox/id1/v2/00001.wav"),
               record("vox_id2_v1_00001", "vox", "id2", "vox/id2/v1/00001.wav"),
               record("mtg_a_s1", "mtg", "a", "mtg/rec.wav", start=0.0),
               record("mtg_b_s2", "mtg", "b", "mtg/rec.wav", start=2.0)]
    keys = [r["key"] for r in records]
    matrix = rng.standard_normal((len(keys), 16)).astype(np.float32)
    failures = [{"key": "vox_id3_v1_00001", "path": "/data/vox/id3/v1/00001.wav", "stage": "decode",
                 "reason": "truncated"}]
    return make_final(tmp_path / "final", keys, matrix, records, failures), keys, matrix


def cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_lookups_and_unscorable_trials_are_reported(final, tmp_path):
    final_dir, keys, matrix = final
    trials = tmp_path / "trials.txt"
    trials.write_text("vox_id1_v1_00001 vox_id1_v2_00001 target\n"          # keys
                      "/data/vox/id1/v1/00001.wav vox/id2/v1/00001.wav nontarget\n"  # absolute, rel_path
                      "id1/v2/00001.wav id2/v1/00001.wav nontarget\n"          # relative to a dataset folder
                      "vox_id1_v1_00001 mtg_a_s1 nontarget\n"
                      "vox_id1_v1_00001 id3/v1/00001.wav nontarget\n"          # failed at extraction
                      "nobody vox_id1_v1_00001 nontarget\n"                    # unknown
                      "mtg/rec.wav vox_id1_v1_00001 nontarget\n")              # two segments share the file
    result = score.score_trials(final_dir, trials)
    assert result["num_trials"] == 4 and result["num_unscored"] == 3
    assert (result["num_target"], result["num_nontarget"]) == (1, 3)
    np.testing.assert_allclose(result["scores"], [cos(matrix[0], matrix[1]), cos(matrix[0], matrix[2]),
                                                  cos(matrix[1], matrix[2]), cos(matrix[0], matrix[3])], rtol=1e-6)
    reasons = {u["line"]: u["reason"] for u in result["unscored"]}
    assert "failed at extraction (decode: truncated)" in reasons[5]
    assert "'nobody' is neither a key nor an audio path" in reasons[6]
    assert "audio of 2 utterances (segments)" in reasons[7]
    assert result["eer"] == pytest.approx(score.compute_eer(result["scores"], [1, 0, 0, 0]))


def test_pickle_is_used_without_npz_only_when_allowed(final, tmp_path):
    _, keys, matrix = final
    records = json.loads((final[0] / "utterance_list.json").read_text())
    other = make_final(tmp_path / "pkl_only", keys, matrix, records, write_npz=False)
    assert not (other / "utterance_embeddings.npz").exists()
    with pytest.raises(score.ScoreError, match="only as a pickle .*allow_pickle"):
        score.load_embeddings(other)
    got_keys, got = score.load_embeddings(other, allow_pickle=True)
    assert got_keys == sorted(keys)
    np.testing.assert_array_equal(got, matrix[np.argsort(keys)])


def test_mean_subtraction_and_asnorm_match_numpy(final, tmp_path, caplog):
    final_dir, keys, matrix = final
    rng = np.random.default_rng(2)
    cohort_records = [record(f"c_s{i}_u{j}", "c", f"s{i}", f"c/s{i}/u{j}.wav") for i in range(12) for j in range(2)]
    cohort_matrix = (rng.standard_normal((24, 16)) + 0.3).astype(np.float32)
    cohort_dir = make_final(tmp_path / "cohort", [r["key"] for r in cohort_records], cohort_matrix, cohort_records)
    pairs = [(0, 1, 1), (0, 2, 0), (1, 2, 0), (2, 3, 0), (3, 4, 1)]
    trials = [(keys[a], keys[b], label) for a, b, label in pairs]
    top_n = 5

    mean = cohort_matrix.astype(np.float64).mean(axis=0)           # --mean_from the cohort
    unit = lambda m: m / np.linalg.norm(m, axis=-1, keepdims=True)
    ev = unit(matrix.astype(np.float64) - mean)
    # speaker-level cohort: the speaker means merge stores (float32)
    spk = unit(cohort_matrix.astype(np.float64).reshape(12, 2, 16).mean(axis=1).astype(np.float32) - mean)
    expected = []
    for a, b, _ in pairs:
        s = ev[a] @ ev[b]
        top_a = np.sort(spk @ ev[a])[-top_n:]
        top_b = np.sort(spk @ ev[b])[-top_n:]
        expected.append(0.5 * ((s - top_a.mean()) / top_a.std() + (s - top_b.mean()) / top_b.std()))
    with caplog.at_level(logging.WARNING, logger="speakerlab"):
        result = score.score_trials(final_dir, trials, mean_from=cohort_dir, asnorm_cohort=cohort_dir,
                                    asnorm_top_n=top_n)
    assert not [r for r in caplog.records if "asnorm_top_n" in r.getMessage()]  # 5 of 12: no warning
    np.testing.assert_allclose(result["scores"], expected, rtol=1e-9, atol=1e-9)
    assert result["normalization"]["asnorm"] == {"cohort": str(cohort_dir), "level": "speaker", "top_n": 5,
                                                 "cohort_size": 12}

    # mean of the evaluation set itself, no AS-norm
    own = unit(matrix.astype(np.float64) - matrix.astype(np.float64).mean(axis=0))
    result = score.score_trials(final_dir, trials, mean_subtraction=True)
    np.testing.assert_allclose(result["scores"], [own[a] @ own[b] for a, b, _ in pairs], rtol=1e-9)

    # utterance-level cohort, top_n larger than the cohort uses all of it, and says so
    with caplog.at_level(logging.WARNING, logger="speakerlab"):
        result = score.score_trials(final_dir, trials, asnorm_cohort=cohort_dir, asnorm_top_n=100,
                                    cohort_level="utterance")
    warned = [r.getMessage() for r in caplog.records if "asnorm_top_n" in r.getMessage()]
    assert warned == [f"warning: --asnorm_top_n 100 is larger than the cohort (24 utterance embeddings in "
                      f"{cohort_dir}): AS-norm uses all 24"]
    raw, utt = unit(matrix.astype(np.float64)), unit(cohort_matrix.astype(np.float64))
    a, b = pairs[0][:2]
    s = raw[a] @ raw[b]
    want = 0.5 * ((s - (utt @ raw[a]).mean()) / (utt @ raw[a]).std() + (s - (utt @ raw[b]).mean()) / (utt @ raw[b]).std())
    assert result["scores"][0] == pytest.approx(want, rel=1e-9)
    assert result["normalization"]["asnorm"]["top_n"] == 24


def test_command_line(final, tmp_path, capsys):
    final_dir, keys, _ = final
    trials = tmp_path / "trials.txt"
    trials.write_text(f"1 {keys[0]} {keys[1]}\n0 {keys[0]} {keys[2]}\n0 {keys[1]} {keys[2]}\n0 {keys[0]} ghost\n")
    out = tmp_path / "res" / "scores.json"
    assert score.main(["--embeddings", str(final_dir), "--trials", str(trials), "--output", str(out),
                       "--score_file", str(tmp_path / "scores.txt")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = json.loads(out.read_text())
    assert printed["eer"] == written["eer"] and written["num_trials"] == 3
    assert set(written) >= {"eer", "min_dcf_0.01", "min_dcf_0.05", "num_trials", "unscored", "num_unscored"}
    assert written["unscored"] == [{"line": 4, "enroll": keys[0], "test": "ghost",
                                    "reason": f"'ghost' is neither a key nor an audio path in {final_dir}"}]
    lines = (tmp_path / "scores.txt").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"{keys[0]} {keys[1]} ") and lines[0].endswith(" target")
    assert score.main(["--embeddings", str(final_dir), "--trials", str(trials), "--strict"]) == 1
    (tmp_path / "none.txt").write_text("ghost phantom target\n")
    assert score.main(["--embeddings", str(final_dir), "--trials", str(tmp_path / "none.txt")]) == 1
    assert "none of the trials" in capsys.readouterr().err
    assert score.main(["--embeddings", str(tmp_path / "nope"), "--trials", str(trials)]) == 2
    assert "error: --embeddings" in capsys.readouterr().err
    assert score.main(["--embeddings", str(tmp_path), "--trials", str(trials)]) == 2
    assert "is not a complete final dir: complete.json is missing" in capsys.readouterr().err
