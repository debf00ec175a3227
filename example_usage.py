#!/usr/bin/env python3
"""What you can do with a final embeddings dir, using the speakerlab Python API.

    python example_usage.py exp/embeddings                      # the demos, printed
    python example_usage.py exp/embeddings --plot exp/plots     # ... and PNG pictures
    python example_usage.py exp/embeddings --query ds_spk_utt -k 5 --speaker spk --dataset ds
    python example_usage.py exp/embeddings --pair a.wav ds_spk_utt2 --trials trials.txt --plot exp/plots

Each section below is a few lines of the API (``speakerlab.load_embeddings`` and friends): read it
as a recipe for your own notebook.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

import speakerlab

MAX_TABLE = 12  # speakers shown in the printed similarity table


def section(title: str) -> None:
    print(f"\n== {title}")


def short(emb, key: str) -> str:
    """Keys without the dataset prefix when the set has one dataset (easier to read)."""
    if len(emb.datasets) == 1 and key.startswith(emb.datasets[0] + "_"):
        return key[len(emb.datasets[0]) + 1:]
    return key


def overview(emb) -> None:
    section(f"Embeddings in {emb.directory}")
    model = emb.summary.get("model", {}).get("name", "unknown model")
    print(f"{len(emb)} utterances, {len(emb.speakers)} speakers, {len(emb.datasets)} dataset(s): "
          f"{', '.join(emb.datasets)}; {emb.dim}-d embeddings from {model}")


def default_query(emb) -> str:
    """The first utterance of the speaker with the most utterances (so it has same-speaker neighbours)."""
    counts = {}
    for label in emb.speaker_labels():
        counts[label] = counts.get(label, 0) + 1
    busiest = max(sorted(counts), key=lambda s: counts[s])
    return next(k for k, s in zip(emb.keys, emb.speaker_labels()) if s == busiest)


def query_speaker(emb, query: str):
    """Speaker key of a query from the set (utterance key, speaker key or path), else None."""
    if query in emb.speakers:
        return query
    key = query if query in emb else emb.find_path(query)
    return emb.speaker_of(key) if key else None


def pair_demo(emb, query: str, pair) -> None:
    section("1. Similarity of two utterances (cosine of their embeddings)")
    if pair:
        a, b = pair
        print(f"{a}  vs  {b}: {emb.score(a, b):.3f}")
        return
    if query_speaker(emb, query) is None:  # a new file: compare it with its nearest utterance
        best = emb.similar(query, k=1)[0]
        print(f"{query}  vs  {short(emb, best.key)} (its nearest): {best.score:.3f}")
        return
    same = emb.similar(query, k=1, same_speaker=True)
    other = emb.similar(query, k=1, same_speaker=False)
    if same:
        print(f"same speaker:       {short(emb, query)}  vs  {short(emb, same[0].key)}: "
              f"{emb.score(query, same[0].key):.3f}")
    if other:
        far = emb.similar(query, k=len(emb), same_speaker=False)[-1]
        print(f"different speakers: {short(emb, query)}  vs  {short(emb, far.key)}: {far.score:.3f}")
    print("(speakerlab.load_model().compare('a.wav', 'b.wav') does the same for any two files)")


def topk_demo(emb, query: str, k: int) -> None:
    speaker = query_speaker(emb, query)
    section(f"2. Top-{k} utterances most similar to {short(emb, query)}"
            + (f" (speaker {short(emb, speaker)})" if speaker else ""))
    kinds = [("any speaker", None)] + ([("same speaker", True), ("other speakers", False)] if speaker else [])
    for label, same in kinds:
        matches = emb.similar(query, k=k, same_speaker=same)
        print(f"{label}:")
        for match in matches:
            mark = "" if speaker is None else ("  (same speaker)" if emb.speaker_of(match.key) == speaker else "")
            print(f"  {match.score:6.3f}  {short(emb, match.key)}{mark}")
        if not matches:
            print("  (none)")


def speaker_table(emb) -> None:
    keys, sims = emb.speaker_similarity()
    shown = keys[:MAX_TABLE]
    section("3. Speaker-by-speaker similarity (cosine of speaker embeddings)"
            + (f", first {MAX_TABLE} of {len(keys)} speakers" if len(keys) > MAX_TABLE else ""))
    names = [short(emb, k) for k in shown]
    width = max(8, max(len(n) for n in names) + 2)
    print(" " * width + "".join(f"{n[:9]:>10}" for n in names))
    for i, name in enumerate(names):
        print(f"{name:<{width}}" + "".join(f"{sims[i, j]:10.3f}" for j in range(len(names))))
    if len(keys) > 1:
        closest = max(((sims[i, j], keys[i], keys[j]) for i in range(len(keys)) for j in range(i + 1, len(keys))))
        print(f"most similar pair of speakers: {short(emb, closest[1])} and {short(emb, closest[2])} "
              f"({closest[0]:.3f})")
        cosine_ranges(emb)


def cosine_ranges(emb) -> None:
    """How far apart the speakers are, utterance by utterance and against the speaker embeddings
    (the README's demo figures come from here)."""
    from speakerlab.plots import pair_scores
    same, other = pair_scores(emb)  # all utterance pairs, sampled when there are very many
    if len(same) and len(other):
        print(f"utterance pairs: same speaker {same.min():.2f} to {same.max():.2f} ({len(same)} pairs), "
              f"different speakers {other.min():.2f} to {other.max():.2f} ({len(other)} pairs)")
    keys, unit = emb.matrix(normalize=True)
    speakers, spk_unit = emb.matrix("speaker", normalize=True)
    if len(keys) * len(speakers) > 20_000_000:
        return
    sims = unit @ spk_unit.T
    own = np.array([speakers.index(emb.speaker_of(k)) for k in keys])
    mine = sims[np.arange(len(keys)), own]
    sims[np.arange(len(keys)), own] = np.nan
    print(f"utterance to speaker embedding: its own {mine.min():.2f} to {mine.max():.2f}, "
          f"other speakers {np.nanmin(sims):.2f} to {np.nanmax(sims):.2f}")


def search_demo(emb, dataset: str, speaker: str, k: int) -> None:
    section("4. Search by dataset and by speaker")
    part = emb.by_dataset(dataset)
    print(f"dataset {dataset}: {len(part)} utterances of {len(part.speakers)} speakers")
    one = emb.by_speaker(speaker)
    print(f"speaker {short(emb, speaker)}: {len(one)} utterance(s): "
          + ", ".join(short(emb, key) for key in one.keys[:10]) + (" ..." if len(one) > 10 else ""))
    for spk_key in list(one.speakers)[:1]:
        neighbours = emb.similar_speakers(spk_key, k=k)
        if neighbours:
            print(f"speakers closest to {short(emb, spk_key)}: "
                  + ", ".join(f"{short(emb, m.key)} ({m.score:.3f})" for m in neighbours))
    keys, matrix = one.matrix()
    print(f"its embedding matrix for your own analysis: one.matrix() -> {len(keys)} keys, array {matrix.shape}")


def report_demo(final_dir: Path) -> None:
    section("5. Text report (python -m speakerlab.report FINAL_DIR)")
    try:
        from speakerlab import report
    except ImportError:
        print("speakerlab.report is not available in this checkout; skipped")
        return
    try:
        print(report.render(final_dir), end="")
    except report.ReportError as exc:
        print(f"no report: {exc}")


def trial_explainer(final_dir: Path):
    """Why a trial side is not in the set (failed at extraction, or unknown), as speakerlab.score says it."""
    from speakerlab.score import EmbeddingTable, ScoreError
    try:
        resolver = EmbeddingTable.from_dir(final_dir).index()
    except ScoreError:
        return None
    return lambda name: resolver.lookup(name)[1] or f"'{name}' is not in this set"


def trials_demo(trials: str, target, nontarget, skipped=()) -> None:
    from speakerlab.plots import equal_error_rate
    section(f"6. Trials {trials}: cosine scoring")
    print(f"{len(target)} target, {len(nontarget)} non-target trials")
    if skipped:
        print(f"{len(skipped)} trial(s) skipped, not scored:")
        for entry in skipped[:10]:
            print(f"  line {entry['line']}: {entry['reason']}")
        if len(skipped) > 10:
            print(f"  ... and {len(skipped) - 10} more")
    if len(target):
        print(f"mean target score {target.mean():.3f}")
    if len(nontarget):
        print(f"mean non-target score {nontarget.mean():.3f}")
    if len(target) and len(nontarget):
        eer, threshold = equal_error_rate(target, nontarget)
        print(f"EER {eer:.2%} at threshold {threshold:.3f}")


def plot_demo(emb, out_dir: Path, trials, method: str, scores=None) -> None:
    from speakerlab import plots
    section(f"Pictures in {out_dir}")
    for path in plots.plot_all(emb, out_dir, trials=trials, method=method, scores=scores):
        print(f"  {path}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Demonstrate the speakerlab API on a final embeddings dir.")
    p.add_argument("final_dir", help="output of merge_embeddings.py / run_embedding_extraction.sh")
    p.add_argument("--query", help="utterance key, speaker key or audio path (default: a busy speaker's first)")
    p.add_argument("-k", type=int, default=5, help="how many similar utterances/speakers to list")
    p.add_argument("--pair", nargs=2, metavar=("A", "B"), help="two utterance keys or paths to compare")
    p.add_argument("--dataset", help="dataset to search (default: the first)")
    p.add_argument("--speaker", help="speaker key or id to search (default: the query's speaker)")
    p.add_argument("--plot", metavar="OUT_DIR", help="also write PNG pictures into OUT_DIR")
    p.add_argument("--trials", help="trials file (enroll test target|nontarget) for the score plots")
    p.add_argument("--method", choices=["auto", "pca", "tsne"], default="auto", help="2-D projection")
    p.add_argument("--no_report", action="store_true", help="skip the text report")
    p.add_argument("--allow_pickle", action="store_true",
                   help="read a dir that holds only pickles (unpickling runs code: only dirs you trust)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    final_dir = Path(args.final_dir)
    try:
        emb = speakerlab.load_embeddings(final_dir, allow_pickle=args.allow_pickle)
        if not len(emb):
            raise ValueError(f"{final_dir} holds no utterance embeddings")
        if args.k < 1:
            raise ValueError("-k must be at least 1")
        if args.plot:
            try:
                import matplotlib  # noqa: F401
                import sklearn  # noqa: F401
            except ImportError as exc:
                raise ValueError(f"--plot needs matplotlib and scikit-learn ({exc}); "
                                 "pip install -r requirements.txt") from None
        trial_scores = None
        if args.trials:
            from speakerlab import plots
            if not Path(args.trials).is_file():
                raise ValueError(f"--trials {args.trials} is not a file")
            # trials naming files that failed or are not in the set are listed and skipped, as
            # speakerlab.score does; none left to score is an error
            skipped = []
            trial_scores = plots.trial_scores(emb, args.trials, skipped=skipped, explain=trial_explainer(final_dir))
            if not sum(map(len, trial_scores)):
                raise ValueError(f"none of the trials in {args.trials} could be scored "
                                 f"(line {skipped[0]['line']}: {skipped[0]['reason']})" if skipped else
                                 f"{args.trials} holds no trials")
        query = args.query or default_query(emb)
        emb.embedding(query)  # fails early, with the reason, on an unknown query
        for name in args.pair or ():
            emb.embedding(name)
        dataset = args.dataset or emb.datasets[0]
        speaker = args.speaker or query_speaker(emb, query) or emb.speaker_labels()[0]
        emb.by_dataset(dataset)
        emb.by_speaker(speaker)
    except (OSError, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2

    overview(emb)
    pair_demo(emb, query, args.pair)
    topk_demo(emb, query, args.k)
    speaker_table(emb)
    search_demo(emb, dataset, speaker, args.k)
    if not args.no_report:
        report_demo(final_dir)
    if trial_scores is not None:
        trials_demo(args.trials, *trial_scores, skipped=skipped)
    if args.plot:
        plot_demo(emb, Path(args.plot), args.trials, args.method, trial_scores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
