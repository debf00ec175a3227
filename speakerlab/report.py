"""A short plain-text report of a final (merged) output dir.

    python -m speakerlab.report FINAL_DIR [--top N]

Reads only the summary and the speaker list (through ``speakerlab.finaldir``, which checks the dir's
completeness record first): counts and durations, how the numbers were
made, a per-dataset table, the noisiest speakers with their outliers and the closest speaker
pairs. ``render(final_dir)`` returns the same text for use from Python.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from speakerlab.progname import prog
from speakerlab.finaldir import FAILURES, SPEAKER_LIST


class ReportError(Exception):
    pass


def _load(final_dir: Path):
    """(summary, speaker list) of a verified final dir."""
    from speakerlab.finaldir import FinalDir, FinalDirError
    try:
        final = FinalDir.open(final_dir)
        return final.summary(), final.speaker_list()
    except FinalDirError as exc:
        raise ReportError(str(exc)) from None


def _table(header: Sequence[str], rows: List[Sequence], right: Sequence[bool]) -> List[str]:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        lines.append("  " + "  ".join(parts).rstrip())
    return lines


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render(final_dir, top: int = 10) -> str:
    final_dir = Path(final_dir)
    summary, speakers = _load(final_dir)
    out: List[str] = [f"Speaker embeddings in {final_dir}"]

    model = summary.get("model") or {}
    features = summary.get("features") or {}
    mean = summary.get("speaker_mean") or {}
    runs = summary.get("runs") or []
    out.append(f"  model    {model.get('name', '?')}  sha256 {str(model.get('sha256', '?'))[:12]}  "
               f"dtype {summary.get('dtype', '?')}")
    out.append(f"  features {features.get('sample_rate', '?')} Hz, {features.get('num_mel_bins', '?')} fbank bins, "
               f"mean normalisation {'on' if features.get('mean_norm') else 'off'}")
    out.append(f"  speaker embedding = {mean.get('rule', 'plain')} mean"
               + (", duration-weighted" if mean.get("duration_weighted") else "")
               + f"; {len(runs)} run(s): " + ", ".join(f"{r.get('data_root')} (world size {r.get('world_size')})"
                                                    for r in runs))
    if summary.get("partial"):
        out.append("  PARTIAL merge: " + "; ".join(summary.get("problems", [])))
    out.append("")
    ignored = sum((summary.get("ignored_files") or {}).values())
    out.append(f"{summary.get('total_utterances', 0)} utterances, {summary.get('total_speakers', 0)} speakers, "
               f"{_hms(summary.get('total_duration_s', 0.0))} of audio, {summary.get('failures', 0)} failed, "
               f"{ignored} ignored, {summary.get('embedding_dimension', '?')}-d embeddings"
               + (f"; {summary['scan_errors']} path(s) could not be scanned (see {FAILURES})"
                  if summary.get("scan_errors") else ""))

    datasets = summary.get("datasets") or {}
    if datasets:
        out.append("")
        rows = [(name, d.get("speakers", 0), d.get("utterances", 0), _hms(d.get("duration_s", 0.0)),
                 d.get("failures", 0)) for name, d in datasets.items()]
        out += _table(("dataset", "speakers", "utterances", "duration", "failed"), rows,
                      (False, True, True, True, True))

    stats = summary.get("speaker_statistics")
    measured = [s for s in speakers if s.get("mean_cosine") is not None]
    if stats is None or not measured:
        out.append("")
        out.append("(no speaker statistics: merged by an older version)")
        return "\n".join(out) + "\n"
    out.append("")
    out.append(f"{stats['speakers_with_outliers']} speaker(s) with outliers ({stats['outlier_utterances']} "
               f"utterance(s)); {stats['speakers_with_fewer_than_2_utterances']} speaker(s) with fewer than "
               "2 utterances")

    noisy = sorted((s for s in measured if s.get("num_utterances", 0) >= 2),
                   key=lambda s: (s["mean_cosine"], s["key"]))[:top]
    if noisy:
        out.append("")
        out.append("Noisiest speakers (lowest mean cosine of their utterances to the speaker embedding):")
        rows = [(s["key"], s["num_utterances"], f"{s.get('duration_s', 0.0):.1f}", _fmt(s["mean_cosine"]),
                 _fmt(s["min_cosine"]), len(s.get("outliers") or [])) for s in noisy]
        out += _table(("speaker", "utts", "seconds", "mean_cos", "min_cos", "outliers"), rows,
                      (False, True, True, True, True, True))

    flagged = sorted((s for s in measured if s.get("outliers")), key=lambda s: (s["min_cosine"], s["key"]))
    if flagged:
        out.append("")
        out.append("Outliers (cosine to the rest of their speaker far below the speaker's typical value):")
        for s in flagged[:top]:
            keys = s["outliers"]
            shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
            out.append(f"  {s['key']} ({len(keys)} of {s['num_utterances']}): {shown}")
        if len(flagged) > top:
            out.append(f"  ... {len(flagged) - top} more speakers: see {SPEAKER_LIST}")

    pairs = summary.get("closest_speaker_pairs") or []
    if pairs:
        out.append("")
        out.append("Closest speaker pairs (possible duplicate identities):")
        out += _table(("cosine", "speaker_a", "speaker_b"), [(f"{c:.3f}", a, b) for a, b, c in pairs[:top]],
                      (True, False, False))
    return "\n".join(out) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=prog("speakerlab.report"),
                                description="Print a short report of a merged output dir.")
    p.add_argument("final_dir")
    p.add_argument("--top", type=int, default=10, help="rows per table (default 10)")
    args = p.parse_args(argv)
    if args.top < 1:
        print("error: --top must be >= 1", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(render(args.final_dir, args.top))
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
