"""Pictures, scores and example_usage.py on a final dir written by the real writers (synthetic vectors)."""
import sys

import numpy as np
import pytest

import speakerlab
from speakerlab import finaldir
from tests.helpers import ROOT, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_final(out, datasets=("dsA", "dsB"), speakers=3, per_speaker=(6, 14), dim=32, seed=0, failures=(),
                crowded=0):
    """``crowded``: that many speakers (the last ones) share nearly one direction, so their stars crowd."""
    """A final dir like merge writes it: clustered vectors, one cluster per speaker."""
    rng = np.random.default_rng(seed)
    shared = 3.0 * rng.standard_normal(dim)
    keys, rows, utt_list, spk_keys, spk_rows, spk_list = [], [], [], [], [], []
    for dataset in datasets:
        for s in range(speakers):
            speaker = f"spk{s}"
            centre = rng.standard_normal(dim)
            if s >= speakers - crowded:
                centre = shared + 0.05 * centre
            count = int(rng.integers(*per_speaker))
            members = centre + 0.7 * rng.standard_normal((count, dim))
            for u, row in enumerate(members):
                key = f"{dataset}_{speaker}_u{u:02d}"
                keys.append(key)
                rows.append(row)
                utt_list.append({"key": key, "dataset": dataset, "speaker_id": speaker,
                                 "speaker_key": f"{dataset}_{speaker}", "utterance_id": f"u{u:02d}",
                                 "path": f"/data/{dataset}/{speaker}/u{u:02d}.wav",
                                 "rel_path": f"{dataset}/{speaker}/u{u:02d}.wav", "duration": 1.0 + u,
                                 "sample_rate": 16000})
            spk_keys.append(f"{dataset}_{speaker}")
            spk_rows.append(members.mean(axis=0))
            spk_list.append({"key": f"{dataset}_{speaker}", "dataset": dataset, "speaker_id": speaker,
                             "num_utterances": count, "duration_s": float(count)})
    order = np.argsort(keys)
    keys = [keys[i] for i in order]
    utt_list = [utt_list[i] for i in order]
    matrix = np.array(rows, np.float32)[order]
    summary = {"total_utterances": len(keys), "total_speakers": len(spk_keys), "model": {"name": "synthetic"}}
    out.mkdir(parents=True, exist_ok=True)
    finaldir.write(out, ["pkl", "npz"], keys, matrix, utt_list, spk_keys, np.array(spk_rows, np.float32),
                   spk_list, list(failures), summary)
    return out


@pytest.fixture(scope="module")
def final(tmp_path_factory):
    return write_final(tmp_path_factory.mktemp("plots") / "final")


def assert_png(path, min_bytes=10000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) >= min_bytes, (path, len(data))


def test_plot_all_writes_readable_pngs(final, tmp_path):
    from speakerlab import plots
    emb = speakerlab.load_embeddings(final)
    assert len(emb) >= plots.TSNE_MIN_POINTS  # the t-SNE path
    written = plots.plot_all(emb, tmp_path / "pics")
    assert [p.name for p in written] == ["speaker_map.png", "speaker_similarity.png", "utterance_similarity.png",
                                         "score_histograms.png", "det_curve.png"]
    for path in written:
        assert_png(path)


def test_small_sets_use_pca(final, tmp_path):
    from speakerlab import plots
    emb = speakerlab.load_embeddings(final).by_speaker("dsA_spk0", "dsB_spk1")
    points, how = plots.project_2d(emb.matrix()[1][:8])
    assert points.shape == (8, 2) and how.startswith("PCA")
    assert_png(plots.speaker_map(emb, tmp_path / "map.png"))


def test_det_points_and_eer():
    from speakerlab.plots import det_points, equal_error_rate
    assert equal_error_rate([0.9, 0.8], [0.1, 0.2])[0] == 0.0
    eer, threshold = equal_error_rate([0.9, 0.8, 0.3], [0.1, 0.2, 0.85])
    assert eer == pytest.approx(1 / 3) and 0.3 <= threshold <= 0.85
    fa, miss, _ = det_points([0.9, 0.8, 0.3], [0.1, 0.2, 0.85])
    assert fa[0] == 0.0 and miss[0] == 1.0 and fa[-1] == 1.0 and miss[-1] == 0.0
    assert np.all(np.diff(miss) <= 0) and np.all(np.diff(fa) >= 0)
    with pytest.raises(ValueError):
        det_points([0.5], [])


@pytest.mark.parametrize("crowded", [0, 14])
def test_speaker_map_labels_never_overlap(tmp_path, crowded):
    """Star labels overlap no other label and no star; where there is no room (crowded speakers) a
    label is left out and the title says so, the legend still naming every speaker."""
    from speakerlab import plots
    emb = speakerlab.load_embeddings(write_final(tmp_path / "f", datasets=("dsA",), speakers=20, per_speaker=(2, 5),
                                                 dim=8, crowded=crowded, seed=3))
    fig, ax, legends = plots.draw_speaker_map(emb, method="pca")
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text().startswith("spk")]
    boxes = [t.get_window_extent(renderer) for t in labels]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (labels[i].get_text(), labels[j].get_text())
    stars = [c for c in ax.collections if c.get_sizes()[0] == plots.STAR_SIZE]
    centres = ax.transData.transform(np.array([c.get_offsets()[0] for c in stars]))
    radius = np.sqrt(plots.STAR_SIZE) / 2 * fig.dpi / 72 * 0.8
    for box, text in zip(boxes, labels):
        for x, y in centres:  # the label's box keeps clear of every star's body
            dx, dy = max(box.x0 - x, 0, x - box.x1), max(box.y0 - y, 0, y - box.y1)
            assert max(dx, dy) >= radius * 0.99, text.get_text()
    assert len(legends[0].get_texts()) == 20
    if not crowded:
        assert len(labels) == 20  # room for all
        assert "left out" not in ax.get_title()
    else:
        assert 0 < len(labels) < 20 and "label(s) left out for room" in ax.get_title()
    plots._pyplot().close(fig)


def test_speaker_map_single_utterance_speakers_show_above_their_star(tmp_path):
    from speakerlab import plots
    emb = speakerlab.load_embeddings(write_final(tmp_path / "f", speakers=3, per_speaker=(1, 2), dim=8))
    fig, ax, _ = plots.draw_speaker_map(emb, method="pca")
    stars = [c for c in ax.collections if c.get_sizes()[0] == plots.STAR_SIZE]
    points = [c for c in ax.collections if c.get_sizes()[0] != plots.STAR_SIZE]
    assert len(stars) == 6 and len(points) == 6
    for star in stars:  # each star is exactly on its one utterance, drawn below it
        twin = [p for p in points if np.allclose(p.get_offsets()[0], star.get_offsets()[0], atol=1e-6)]
        assert len(twin) == 1 and twin[0].get_zorder() > star.get_zorder()
        assert twin[0].get_sizes()[0] > 36 and np.allclose(twin[0].get_edgecolor()[0], [1, 1, 1, 1])
    plots._pyplot().close(fig)


def test_trials_files(final, tmp_path):
    from speakerlab.plots import pair_scores, trial_scores
    emb = speakerlab.load_embeddings(final)
    kaldi = tmp_path / "trials"
    kaldi.write_text("dsA_spk0_u00 dsA_spk0_u01 target\n# comment\n\n"
                     "dsA/spk0/u00.wav dsB_spk1_u00 nontarget\n")
    vox = tmp_path / "vox"
    vox.write_text("1 dsA_spk0_u00 dsA_spk0_u01\n0 /data/dsA/spk0/u00.wav dsB_spk1_u00\n")
    target, nontarget = trial_scores(emb, kaldi)
    assert len(target) == 1 and len(nontarget) == 1
    vox_target, vox_nontarget = trial_scores(emb, vox)
    assert list(target) == pytest.approx(list(vox_target))
    assert list(nontarget) == pytest.approx(list(vox_nontarget))
    assert target[0] == pytest.approx(emb.score("dsA_spk0_u00", "dsA_spk0_u01"))
    bad = tmp_path / "bad"
    bad.write_text("a b c d\n")
    with pytest.raises(ValueError, match="bad:1"):
        trial_scores(emb, bad)
    unknown = tmp_path / "unknown"
    unknown.write_text("nobody dsA_spk0_u01 target\n")
    with pytest.raises(KeyError, match="nobody"):
        trial_scores(emb, unknown)
    target, nontarget = pair_scores(emb)
    n = len(emb)
    assert len(target) + len(nontarget) == n * (n - 1) // 2
    assert target.mean() > nontarget.mean() + 0.3  # clustered speakers
    sampled_t, sampled_n = pair_scores(emb, max_pairs=200)
    assert 0 < len(sampled_t) <= 100 and 0 < len(sampled_n) <= 100


def test_example_usage_prints_demos_and_plots(final, tmp_path):
    r = run_cli([sys.executable, ROOT / "example_usage.py", final, "-k", "3", "--method", "pca",
                 "--plot", tmp_path / "pics"])
    assert r.returncode == 0, r.stderr
    for heading in ("1. Similarity of two utterances", "2. Top-3 utterances most similar to",
                    "3. Speaker-by-speaker similarity", "4. Search by dataset and by speaker", "5. Text report"):
        assert heading in r.stdout
    assert "same speaker:" in r.stdout and "other speakers:" in r.stdout
    assert len(list((tmp_path / "pics").glob("*.png"))) == 5
    # the cosine ranges it prints are those of the set
    emb = speakerlab.load_embeddings(final)
    keys, unit = emb.matrix(normalize=True)
    labels = emb.speaker_labels()
    sims = unit @ unit.T
    pairs = [(sims[i, j], labels[i] == labels[j]) for i in range(len(keys)) for j in range(i + 1, len(keys))]
    same = [c for c, s in pairs if s]
    other = [c for c, s in pairs if not s]
    assert (f"utterance pairs: same speaker {min(same):.2f} to {max(same):.2f} ({len(same)} pairs), "
            f"different speakers {min(other):.2f} to {max(other):.2f} ({len(other)} pairs)") in r.stdout
    assert "utterance to speaker embedding: its own " in r.stdout
    trials = tmp_path / "trials"
    trials.write_text("dsA_spk0_u00 dsA_spk0_u01 target\ndsA_spk0_u00 dsB_spk1_u00 nontarget\n")
    r = run_cli([sys.executable, ROOT / "example_usage.py", final, "--query", "dsB/spk2/u00.wav",
                 "--dataset", "dsB", "--speaker", "spk1", "--pair", "dsA_spk0_u00", "dsA_spk0", "--no_report",
                 "--trials", trials])
    assert r.returncode == 0, r.stderr
    assert "1 target, 1 non-target trials" in r.stdout and "EER 0.00%" in r.stdout
    assert "(speaker dsB_spk2)" in r.stdout and "speaker spk1: " in r.stdout and "dsA_spk0_u00  vs  dsA_spk0:" in r.stdout


def test_example_usage_lists_and_skips_trials_it_cannot_score(tmp_path):
    failed = {"key": "dsA_spk0_u99", "path": "/data/dsA/spk0/u99.wav", "stage": "decode",
              "reason": "not an audio file"}
    final = write_final(tmp_path / "final", failures=[failed])
    trials = tmp_path / "trials"
    trials.write_text("dsA_spk0_u00 dsA_spk0_u01 target\n"
                      "/data/dsA/spk0/u99.wav dsA_spk0_u01 target\n"
                      "dsA_spk0_u00 nobody nontarget\n"
                      "dsA_spk0_u00 dsB_spk1_u00 nontarget\n")
    r = run_cli([sys.executable, ROOT / "example_usage.py", final, "--no_report", "--trials", trials])
    assert r.returncode == 0, r.stderr
    assert "1 target, 1 non-target trials" in r.stdout and "2 trial(s) skipped, not scored:" in r.stdout
    assert "line 2: '/data/dsA/spk0/u99.wav' failed at extraction (decode: not an audio file)" in r.stdout
    assert "line 3: 'nobody' is neither a key nor an audio path" in r.stdout
    trials.write_text("dsA_spk0_u99 dsA_spk0_u01 target\n")
    r = run_cli([sys.executable, ROOT / "example_usage.py", final, "--no_report", "--trials", trials])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: none of the trials in") and "failed at extraction" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "is not a directory"),
    (["{final}", "--query", "nobody"], "'nobody' is not an utterance key"),
    (["{final}", "--dataset", "dsZ"], "no dataset 'dsZ'"),
    (["{final}", "-k", "0"], "-k must be at least 1"),
    (["{final}", "--trials", "{missing}"], "is not a file"),
])
def test_example_usage_bad_arguments(final, tmp_path, args, message):
    argv = [a.format(final=final, missing=tmp_path / "missing") for a in args]
    r = run_cli([sys.executable, ROOT / "example_usage.py", *argv])
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """./demo.sh: demo data -> pipeline (embedded model, CPU) -> example_usage.py with pictures."""
    r = run_cli(["bash", ROOT / "demo.sh", tmp_path / "demo"], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "== demo done" in r.stdout and "same speaker:" in r.stdout
    assert "utterance pairs: same speaker " in r.stdout and "== done: 8 utterances embedded, 0 failed" in r.stdout
    for name in ("speaker_map", "speaker_similarity", "utterance_similarity", "score_histograms", "det_curve"):
        assert_png(tmp_path / "demo" / "plots" / f"{name}.png")
    emb = speakerlab.load_embeddings(tmp_path / "demo" / "embeddings")
    assert len(emb) == 8 and emb.speaker_keys == ["pyannote_sample_speaker90", "pyannote_sample_speaker91"]
    # the two speakers are apart: every utterance is closer to its own speaker's embedding
    for key in emb.keys:
        best = emb.similar_speakers(emb.utterances[key]["embedding"], k=1)[0]
        assert best.key == emb.speaker_of(key), key
