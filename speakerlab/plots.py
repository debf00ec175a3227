"""Pictures of an ``EmbeddingSet``: a 2-D speaker map, similarity heat maps, score histograms, DET curve.

matplotlib (Agg backend, files only) and scikit-learn (PCA / t-SNE) are imported on first use.
Every function writes one PNG and returns its path; ``plot_all`` writes the set into a folder.
"""
import os
from pathlib import Path
from statistics import NormalDist
from typing import List, Optional, Sequence, Tuple

import numpy as np

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
TSNE_MIN_POINTS = 50   # fewer points: PCA (t-SNE needs perplexity < points and says little on a handful)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path, extra=()) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight", bbox_extra_artists=list(extra) or None)
    _pyplot().close(fig)
    return path


def _colors(count: int):
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if count <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(count)]


def _short_names(keys: Sequence[str], records: Sequence[dict]) -> List[str]:
    """Speaker labels: the bare speaker id when one dataset, else the full key."""
    if len({r["dataset"] for r in records}) == 1:
        return [r["speaker_id"] for r in records]
    return list(keys)


def _top_speakers(emb, max_speakers: int) -> List[str]:
    counts = {}
    for label in emb.speaker_labels():
        counts[label] = counts.get(label, 0) + 1
    ranked = sorted(counts, key=lambda s: (-counts[s], s))
    return sorted(ranked[:max_speakers])


# --- 2-D map ---------------------------------------------------------------------------------
def project_2d(matrix: np.ndarray, method: str = "auto", seed: int = 0) -> Tuple[np.ndarray, str]:
    """Rows (L2-normalised first, so distances follow cosine) -> (N, 2) and the axis-label stem."""
    unit = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    if method == "auto":
        method = "tsne" if len(unit) >= TSNE_MIN_POINTS else "pca"
    if len(unit) < 3:
        method = "pca"
    if method == "tsne":
        from sklearn.manifold import TSNE
        perplexity = float(min(30.0, max(2.0, (len(unit) - 1) / 3.0)))
        points = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca",
                      random_state=seed).fit_transform(unit)
        return points, "t-SNE"
    if method != "pca":
        raise ValueError(f"method must be auto, pca or tsne, not {method!r}")
    from sklearn.decomposition import PCA
    components = min(2, len(unit), unit.shape[1])
    pca = PCA(n_components=components, random_state=seed)
    points = pca.fit_transform(unit)
    if points.shape[1] < 2:
        points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    ratios = list(pca.explained_variance_ratio_) + [0.0, 0.0]
    return points, f"PCA|{ratios[0]:.0%}|{ratios[1]:.0%}"


def speaker_map(emb, path, method: str = "auto", max_speakers: int = 20, max_points: int = 3000,
                seed: int = 0) -> Path:
    """Utterances in 2-D, coloured by speaker, marker by dataset; speaker means as labelled stars."""
    fig, _, legends = draw_speaker_map(emb, method, max_speakers, max_points, seed)
    return _save(fig, path, legends)


STAR_SIZE = 260  # points^2, the speaker stars


def draw_speaker_map(emb, method: str = "auto", max_speakers: int = 20, max_points: int = 3000, seed: int = 0):
    """(figure, axes, legends) of the speaker map, not yet saved (the tests look at its artists)."""
    plt = _pyplot()
    speakers = _top_speakers(emb, max_speakers)
    chosen = set(speakers)
    labels = emb.speaker_labels()
    rows = [i for i, s in enumerate(labels) if s in chosen]
    if len(rows) > max_points:
        rows = sorted(np.random.default_rng(seed).choice(rows, max_points, replace=False).tolist())
    keys, matrix = emb.matrix()
    spk_keys, spk_matrix = emb.matrix("speaker")
    spk_rows = [spk_keys.index(s) for s in speakers]
    # speaker means go through the same projection, so they sit among their utterances
    points, how = project_2d(np.concatenate([matrix[rows], spk_matrix[spk_rows]]), method, seed)
    utt_points, spk_points = points[:len(rows)], points[len(rows):]
    spk_records = [emb.speakers[s] for s in speakers]
    names = _short_names(speakers, spk_records)
    colors = dict(zip(speakers, _colors(len(speakers))))
    datasets = sorted({emb.utterances[keys[i]]["dataset"] for i in rows})
    marker_of = {d: MARKERS[i % len(MARKERS)] for i, d in enumerate(datasets)}

    fig, ax = plt.subplots(figsize=(9, 7))
    records = [emb.utterances[keys[i]] for i in rows]
    # Stars below the utterances: a speaker with one utterance has its star exactly on that utterance,
    # which then shows on top, ringed in white.
    for j, speaker in enumerate(speakers):
        ax.scatter(spk_points[j, 0], spk_points[j, 1], s=STAR_SIZE, marker="*", color=colors[speaker],
                   edgecolors="black", linewidths=0.8, alpha=0.85, zorder=2)
    for speaker in speakers:
        single = sum(r["speaker_key"] == speaker for r in records) == 1
        for dataset in datasets:
            mine = [j for j, r in enumerate(records) if r["speaker_key"] == speaker and r["dataset"] == dataset]
            if mine:
                ax.scatter(utt_points[mine, 0], utt_points[mine, 1], s=60 if single else 36,
                           alpha=1.0 if single else 0.75, color=colors[speaker], marker=marker_of[dataset],
                           edgecolors="white" if single else "none", linewidths=1.2 if single else 0, zorder=3)
    if how.startswith("PCA"):
        _, first, second = how.split("|")
        ax.set_xlabel(f"PC 1 ({first} of variance)")
        ax.set_ylabel(f"PC 2 ({second} of variance)")
        how = "PCA"
    else:
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
    total_speakers = len(emb.speaker_keys)
    shown = f"{len(speakers)} of {total_speakers} speakers (most utterances)" if len(speakers) < total_speakers \
        else f"{total_speakers} speakers"
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], marker="o", linestyle="", color=colors[s], label=n) for s, n in zip(speakers, names)]
    legends = [ax.legend(handles=handles, title="speaker", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                         fontsize=8, ncol=1 if len(handles) <= 25 else 2)]
    if len(datasets) > 1:
        ax.add_artist(legends[0])
        legends.append(ax.legend(handles=[Line2D([], [], marker=marker_of[d], linestyle="", color="grey", label=d)
                                          for d in datasets], title="dataset", loc="lower left",
                                 bbox_to_anchor=(1.01, 0.0), fontsize=8))
    ax.grid(alpha=0.3)
    placed = label_stars(ax, spk_points, names)
    left_out = sum(p is None for p in placed)
    ax.set_title(f"Utterance embeddings ({how}, cosine geometry): {len(rows)} utterances, {shown}\n"
                 "colour = speaker, star = speaker embedding" + (", marker = dataset" if len(datasets) > 1 else "")
                 + (f"; {left_out} star label(s) left out for room (see the legend)" if left_out else ""))
    return fig, ax, legends


def label_stars(ax, anchors, texts, fontsize: float = 9.0):
    """Label each star near it where the label overlaps no other label and no star, trying rings of
    growing radius around it (a thin line leads to a label placed further out). Left out (the legend
    names every speaker): a label with no free place within reach, and the label of a star lying
    under one already labelled. Stars are taken in the given order (most utterances first). Returns
    each label's Annotation, or None where left out."""
    from matplotlib.transforms import Bbox
    fig = ax.figure
    ax.autoscale_view()
    ax.set_xlim(ax.get_xlim())  # fixed now: the labels are placed in pixels
    ax.set_ylim(ax.get_ylim())
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    centres = ax.transData.transform(np.asarray(anchors, dtype=np.float64).reshape(-1, 2))
    star_r = np.sqrt(STAR_SIZE) / 2 * fig.dpi / 72 * 0.8  # the star's body, not its tips
    stars = [Bbox.from_extents(x - star_r, y - star_r, x + star_r, y + star_r) for x, y in centres]
    taken: list = []
    out = []
    angles = np.deg2rad([45, 135, -45, -135, 90, -90, 0, 180])
    for index, text in enumerate(texts):
        probe = ax.text(0, 0, text, fontsize=fontsize, fontweight="bold")
        extent = probe.get_window_extent(renderer)
        probe.remove()
        width, height = extent.width, extent.height
        spot = None
        # a star (nearly) under one already labelled: its label could point at either, so none
        hidden = any(np.hypot(*(centres[index] - centres[j])) < 1.2 * star_r
                     for j, done in enumerate(out) if done is not None)
        for radius in [] if hidden else star_r + np.array([2.0, 10.0, 22.0, 38.0]):
            for angle in angles:
                cx, cy = centres[index] + radius * np.array([np.cos(angle), np.sin(angle)])
                x0 = cx if np.cos(angle) > 0.3 else (cx - width if np.cos(angle) < -0.3 else cx - width / 2)
                y0 = cy if np.sin(angle) > 0.3 else (cy - height if np.sin(angle) < -0.3 else cy - height / 2)
                box = Bbox.from_bounds(x0, y0, width, height)
                if not (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1):
                    continue
                if any(box.overlaps(other) for other in taken) or any(box.overlaps(star) for star in stars):
                    continue
                spot = (box, radius)
                break
            if spot is not None:
                break
        if spot is None:
            out.append(None)
            continue
        box, radius = spot
        taken.append(box)
        scale = 72 / fig.dpi  # pixels -> points
        offset = ((box.x0 - centres[index][0]) * scale, (box.y0 - centres[index][1]) * scale)
        far = radius > star_r + 12
        out.append(ax.annotate(text, anchors[index], xytext=offset, textcoords="offset points", ha="left",
                               va="bottom", fontsize=fontsize, fontweight="bold", zorder=4,
                               arrowprops=dict(arrowstyle="-", color="grey", lw=0.6, shrinkA=0, shrinkB=star_r * scale)
                               if far else None))
    return out


# --- heat maps -------------------------------------------------------------------------------
def _heatmap(ax, fig, matrix, labels, title, annotate, ticks=None):
    """``ticks``: (positions, labels) instead of one label per row."""
    off = matrix[~np.eye(len(matrix), dtype=bool)] if len(matrix) > 1 else np.array([0.0])
    low = min(0.0, float(off.min()))
    image = ax.imshow(matrix, vmin=low, vmax=1.0, cmap="viridis")
    positions, names = ticks if ticks is not None else (range(len(labels)), labels)
    ax.set_xticks(list(positions))
    ax.set_yticks(list(positions))
    ax.set_xticklabels(names, rotation=90, fontsize=8)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    if annotate:
        for i in range(len(matrix)):
            for j in range(len(matrix)):
                value = matrix[i, j]
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if value > low + 0.6 * (1.0 - low) else "white")


def speaker_similarity(emb, path, max_speakers: int = 40) -> Path:
    """Cosine between speaker embeddings, speakers in key order."""
    plt = _pyplot()
    speakers = _top_speakers(emb, max_speakers)
    keys, matrix = emb.speaker_similarity()
    rows = [keys.index(s) for s in speakers]
    sub = matrix[np.ix_(rows, rows)]
    names = _short_names(speakers, [emb.speakers[s] for s in speakers])
    size = min(16.0, max(5.0, 0.35 * len(speakers) + 2.5))
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    shown = f"{len(speakers)} of {len(keys)} speakers" if len(speakers) < len(keys) else f"{len(keys)} speakers"
    _heatmap(ax, fig, sub, names, f"Speaker similarity ({shown})", annotate=len(speakers) <= 15)
    ax.set_xlabel("speaker")
    ax.set_ylabel("speaker")
    return _save(fig, path)


def utterance_similarity(emb, path, max_utterances: int = 80, seed: int = 0) -> Path:
    """Cosine between utterances grouped by speaker: same-speaker blocks on the diagonal."""
    plt = _pyplot()
    keys, unit = emb.matrix(normalize=True)
    labels = emb.speaker_labels()
    rows = list(range(len(keys)))
    if len(rows) > max_utterances:  # the most frequent speakers, a few utterances each
        speakers = _top_speakers(emb, max(1, min(len(emb.speaker_keys), max_utterances // 4)))
        rng = np.random.default_rng(seed)
        per = max(1, max_utterances // len(speakers))
        rows = []
        for speaker in speakers:
            mine = [i for i, s in enumerate(labels) if s == speaker]
            rows += sorted(rng.choice(mine, min(per, len(mine)), replace=False).tolist())
    rows.sort(key=lambda i: (labels[i], keys[i]))
    sub = unit[rows] @ unit[rows].T
    single = len({emb.utterances[keys[i]]["dataset"] for i in rows}) == 1
    names = [keys[i][len(emb.utterances[keys[i]]["dataset"]) + 1:] if single else keys[i] for i in rows]
    bounds = [n for n in range(1, len(rows)) if labels[rows[n]] != labels[rows[n - 1]]]
    ticks, axis_name = None, "utterance"
    if len(rows) > 40:  # too many to name: one label per speaker block
        edges = [0] + bounds + [len(rows)]
        spk = [emb.speakers[labels[rows[a]]] if labels[rows[a]] in emb.speakers else
               {"dataset": "", "speaker_id": labels[rows[a]]} for a in edges[:-1]]
        ticks = ([(a + b - 1) / 2 for a, b in zip(edges[:-1], edges[1:])],
                 _short_names([labels[rows[a]] for a in edges[:-1]], spk))
        axis_name = "utterances, by speaker"
    size = min(16.0, max(5.0, 0.22 * len(rows) + 3.0))
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    _heatmap(ax, fig, sub, names, f"Utterance similarity ({len(rows)} utterances, grouped by speaker)",
             annotate=len(rows) <= 12, ticks=ticks)
    for b in bounds:
        ax.axhline(b - 0.5, color="white", linewidth=1.5)
        ax.axvline(b - 0.5, color="white", linewidth=1.5)
    ax.set_xlabel(axis_name)
    ax.set_ylabel(axis_name)
    return _save(fig, path)


# --- trials, scores, DET ---------------------------------------------------------------------
def trial_scores(emb, trials_path, skipped: Optional[list] = None,
                 explain=None) -> Tuple[np.ndarray, np.ndarray]:
    """(target scores, non-target scores) of a trials file (speakerlab.score's formats); trial
    sides are utterance keys, speaker keys or paths.

    A side that is not in the set raises KeyError, unless ``skipped`` is a list: such trials are then
    left out and listed there as ``{line, enroll, test, reason}`` (``explain(name)`` gives the reason,
    e.g. the file failed at extraction), as ``speakerlab.score`` does."""
    from speakerlab.score import read_trials
    trials = read_trials(trials_path)
    unlabelled = [t for t in trials if t.label is None]
    if unlabelled:
        raise ValueError(f"{trials_path}:{unlabelled[0].line}: trials need target/nontarget labels for plots")

    def resolve(name):
        if name in emb or name in emb.speakers:
            return name
        key = emb.find_path(name)
        if key is None:
            raise KeyError(name)
        return key
    target, nontarget, unknown = [], [], []
    for trial in trials:
        a, b, is_target = trial.enroll, trial.test, bool(trial.label)
        try:
            score = emb.score(resolve(a), resolve(b))
        except KeyError as exc:
            name = str(exc.args[0])
            unknown.append(name)
            if skipped is not None:
                reason = explain(name) if explain else f"'{name}' is not in this set"
                skipped.append({"line": trial.line, "enroll": a, "test": b, "reason": reason})
            continue
        (target if is_target else nontarget).append(score)
    if unknown and skipped is None:
        raise KeyError(f"{len(unknown)} trial side(s) are not in this set, e.g. {unknown[0]!r}")
    return np.array(target), np.array(nontarget)


def pair_scores(emb, max_pairs: int = 200000, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Cosine of utterance pairs: all pairs when few, else all/sampled same-speaker pairs plus as many
    random different-speaker pairs."""
    keys, unit = emb.matrix(normalize=True)
    labels = np.array(emb.speaker_labels())
    n = len(keys)
    if n * (n - 1) // 2 <= max_pairs:
        first, second = np.triu_indices(n, k=1)
    else:
        rng = np.random.default_rng(seed)
        firsts, seconds = [], []
        half = max_pairs // 2
        groups = [np.flatnonzero(labels == s) for s in np.unique(labels)]
        within = sum(len(g) * (len(g) - 1) // 2 for g in groups)
        for g in groups:
            if len(g) < 2:
                continue
            a, b = np.triu_indices(len(g), k=1)
            if within > half:
                pick = rng.random(len(a)) < half / within
                a, b = a[pick], b[pick]
            firsts.append(g[a])
            seconds.append(g[b])
        a = rng.integers(0, n, half * 2)
        b = rng.integers(0, n, half * 2)
        different = labels[a] != labels[b]
        firsts.append(a[different][:half])
        seconds.append(b[different][:half])
        first, second = np.concatenate(firsts), np.concatenate(seconds)
    scores = np.einsum("ij,ij->i", unit[first], unit[second])
    same = labels[first] == labels[second]
    return scores[same], scores[~same]


def det_points(target: Sequence[float], nontarget: Sequence[float]):
    """(false-alarm rates, miss rates, thresholds) at every threshold (speakerlab.score's sweep)."""
    from speakerlab.score import operating_points
    scores = np.concatenate([np.asarray(target, dtype=np.float64), np.asarray(nontarget, dtype=np.float64)])
    labels = np.r_[np.ones(len(target), bool), np.zeros(len(nontarget), bool)]
    return operating_points(scores, labels)


def equal_error_rate(target, nontarget) -> Tuple[float, float]:
    """(EER as a fraction, threshold), as speakerlab.score computes it."""
    from speakerlab.score import eer_with_threshold
    scores = np.concatenate([np.asarray(target, dtype=np.float64), np.asarray(nontarget, dtype=np.float64)])
    labels = np.r_[np.ones(len(target), bool), np.zeros(len(nontarget), bool)]
    return eer_with_threshold(scores, labels)


def score_histograms(target, nontarget, path, source: str = "") -> Path:
    plt = _pyplot()
    target, nontarget = np.asarray(target), np.asarray(nontarget)
    fig, ax = plt.subplots(figsize=(8, 5))
    both = np.concatenate([target, nontarget])
    bins = np.linspace(float(both.min()) - 1e-6, float(both.max()) + 1e-6,
                       int(np.clip(np.sqrt(len(both)) * 2, 10, 80)))
    ax.hist(nontarget, bins=bins, density=True, alpha=0.55, color="tab:red",
            label=f"non-target (different speakers), n={len(nontarget)}")
    ax.hist(target, bins=bins, density=True, alpha=0.55, color="tab:blue",
            label=f"target (same speaker), n={len(target)}")
    title = "Cosine scores: target vs non-target"
    if len(target) and len(nontarget):
        eer, threshold = equal_error_rate(target, nontarget)
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1,
                   label=f"EER threshold {threshold:.3f} (EER {eer:.2%})")
    ax.set_title(title + (f"\n{source}" if source else ""))
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def det_curve(target, nontarget, path, source: str = "") -> Path:
    """Miss vs false-alarm rate on normal-deviate axes, the EER marked."""
    plt = _pyplot()
    fa, miss, _ = det_points(target, nontarget)
    eer, _ = equal_error_rate(target, nontarget)
    floor = 0.5 / max(len(target), len(nontarget), 1000)
    probit = np.vectorize(lambda p: NormalDist().inv_cdf(float(np.clip(p, floor, 1 - floor))))
    ticks = [t for t in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8) if t >= floor]
    fig, ax = plt.subplots(figsize=(6.5, 6.5))
    ax.plot(probit(fa), probit(miss), color="tab:blue", linewidth=2, label="DET")
    ax.plot(probit(eer), probit(eer), "o", color="black", label=f"EER {eer:.2%}")
    lim = (probit(ticks[0]), probit(ticks[-1]))
    ax.plot(lim, lim, color="grey", linestyle=":", linewidth=1, label="miss = false alarm")
    labels = [f"{t * 100:g}" for t in ticks]
    ax.set_xticks(probit(ticks))
    ax.set_xticklabels(labels)
    ax.set_yticks(probit(ticks))
    ax.set_yticklabels(labels)
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_xlabel("false-alarm rate (%)")
    ax.set_ylabel("miss rate (%)")
    ax.set_title(f"DET curve ({len(target)} target, {len(nontarget)} non-target trials)"
                 + (f"\n{source}" if source else ""))
    ax.legend(loc="upper right", fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


# --- all at once -----------------------------------------------------------------------------
def plot_all(emb, out_dir, trials=None, method: str = "auto", max_speakers: int = 20,
             scores: Optional[Tuple[Sequence[float], Sequence[float]]] = None) -> List[Path]:
    """Write the pictures of ``emb`` into ``out_dir``; score plots from ``scores`` (target, non-target)
    when given, else from ``trials`` (a file of trials), else from the set's own utterance pairs
    (same speaker = target)."""
    out_dir = Path(out_dir)
    written = [speaker_map(emb, out_dir / "speaker_map.png", method, max_speakers),
               speaker_similarity(emb, out_dir / "speaker_similarity.png", max(max_speakers, 40)),
               utterance_similarity(emb, out_dir / "utterance_similarity.png")]
    if scores is not None:
        target, nontarget = (np.asarray(s, dtype=np.float64) for s in scores)
        source = f"trials: {os.path.basename(str(trials))}" if trials is not None else "given scores"
    elif trials is not None:
        target, nontarget = trial_scores(emb, trials)
        source = f"trials: {os.path.basename(str(trials))}"
    else:
        target, nontarget = pair_scores(emb)
        source = "all utterance pairs of the set (same speaker = target)"
    if len(target) and len(nontarget):
        written.append(score_histograms(target, nontarget, out_dir / "score_histograms.png", source))
        written.append(det_curve(target, nontarget, out_dir / "det_curve.png", source))
    return written
