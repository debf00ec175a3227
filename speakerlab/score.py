"""Cosine scoring of a trial list against merged embeddings: EER and minDCF.

``python -m speakerlab.score --embeddings FINAL_DIR --trials TRIALS [--output scores.json]``

Trials, one a line (blank lines and ``#`` comments skipped), in either format:
``<a> <b> target|nontarget`` (Kaldi / WeSpeaker) or ``1|0 <a> <b>`` (VoxCeleb); ``<a> <b>`` alone scores
without metrics. ``a``/``b`` are utterance keys or audio paths: absolute, relative to the data root
(``rel_path`` in utterance_list.json), or relative to a dataset folder (VoxCeleb's
``id10270/x6uYqmx31kE/00001.wav`` finds ``<data_root>/<dataset>/id10270/...``). Trials that cannot be
scored are listed with the reason, never dropped silently.

Definitions:
- score: cosine of the two embeddings, after subtracting a mean embedding with ``--mean_subtraction``
  (the mean of all utterances in FINAL_DIR, or of ``--mean_from`` DIR) from evaluation and cohort alike;
- AS-norm (adaptive symmetric score normalisation): for each side, the scores against the cohort
  (``--asnorm_cohort`` DIR, its speaker embeddings by default), their ``top_n`` largest give mean mu and
  standard deviation sigma (population, ddof=0); the score becomes
  ``((s - mu_a) / sigma_a + (s - mu_b) / sigma_b) / 2``;
- EER (percent): where the miss and false-alarm rates are equal, linearly interpolated between the two
  operating points around the crossing;
- minDCF(p): min over thresholds of ``C_miss P_miss p + C_fa P_fa (1 - p)`` with C_miss = C_fa = 1,
  divided by ``min(C_miss p, C_fa (1 - p))`` (the NIST SRE normalisation).
"""
import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from speakerlab.progname import prog
from speakerlab.finaldir import FinalDir, FinalDirError

log = logging.getLogger("speakerlab")
LABELS = {"target": 1, "nontarget": 0}


class ScoreError(ValueError):
    """Bad input: a missing or malformed file, named with the reason."""


# --- metrics -------------------------------------------------------------------------------
def operating_points(scores, labels):
    """(P_fa, P_miss, thresholds) at every distinct threshold, from accept-nothing to accept-all."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError("scores and labels must be 1-D and of one length")
    targets, nontargets = int(labels.sum()), int((~labels).sum())
    if targets == 0 or nontargets == 0:
        raise ValueError("needs at least one target and one nontarget trial")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    order = np.argsort(-scores, kind="mergesort")
    ranked, hits = scores[order], labels[order]
    last_of_value = np.r_[np.nonzero(np.diff(ranked))[0], len(ranked) - 1]  # ties move together
    accepted_targets = np.r_[0, np.cumsum(hits)[last_of_value]]
    accepted_nontargets = np.r_[0, np.cumsum(~hits)[last_of_value]]
    p_fa = accepted_nontargets / nontargets
    p_miss = 1.0 - accepted_targets / targets
    thresholds = np.r_[np.inf, ranked[last_of_value]]
    return p_fa, p_miss, thresholds


def eer_with_threshold(scores, labels) -> Tuple[float, float]:
    """(EER as a fraction, the score threshold at the crossing)."""
    p_fa, p_miss, thresholds = operating_points(scores, labels)
    i = int(np.argmax(p_miss <= p_fa))  # first point past the crossing; i >= 1 since p_miss[0] = 1 > 0
    before, after = p_miss[i - 1] - p_fa[i - 1], p_miss[i] - p_fa[i]
    t = before / (before - after)
    return float(p_fa[i - 1] + t * (p_fa[i] - p_fa[i - 1])), float(thresholds[i])


def compute_eer(scores, labels) -> float:
    """Equal error rate in percent. ``labels``: 1/True = target, 0/False = nontarget."""
    return 100.0 * eer_with_threshold(scores, labels)[0]


def compute_min_dcf(scores, labels, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """Normalised minimum detection cost (see the module docstring)."""
    if not 0.0 < p_target < 1.0:
        raise ValueError("p_target must be in (0, 1)")
    p_fa, p_miss, _ = operating_points(scores, labels)
    cost = c_miss * p_miss * p_target + c_fa * p_fa * (1.0 - p_target)
    return float(cost.min() / min(c_miss * p_target, c_fa * (1.0 - p_target)))


# --- embeddings ----------------------------------------------------------------------------
@dataclass
class EmbeddingTable:
    """Keys, an N x D float32 matrix, and what is needed to find entries by path."""
    keys: List[str]
    matrix: np.ndarray
    records: List[dict] = field(default_factory=list)   # utterance_list.json entries (key, path, rel_path, ...)
    data_roots: List[str] = field(default_factory=list)
    failures: Dict[str, str] = field(default_factory=dict)  # key or path -> why it was not embedded
    source: str = ""

    @classmethod
    def from_dir(cls, final_dir, level: str = "utterance", allow_pickle: bool = False) -> "EmbeddingTable":
        final = _open(final_dir)
        keys, matrix = load_embeddings(final, level, allow_pickle)
        table = cls(keys, matrix, source=str(final_dir))
        if level == "utterance":
            try:
                table.records = final.utterance_list()
                summary = final.summary()
                failures = final.failures()
            except FinalDirError as exc:
                raise ScoreError(str(exc)) from None
            table.data_roots = [run.get("data_root") for run in summary.get("runs", []) if run.get("data_root")]
            for failure in failures:
                why = f"failed at extraction ({failure.get('stage')}: {failure.get('reason')})"
                for name in (failure.get("key"), failure.get("path")):
                    if name:
                        table.failures[name] = why
        return table

    def index(self) -> "Resolver":
        return Resolver(self)


def _open(final_dir) -> FinalDir:
    if isinstance(final_dir, FinalDir):
        return final_dir
    try:
        return FinalDir.open(final_dir)
    except FinalDirError as exc:
        raise ScoreError(str(exc)) from None


def load_embeddings(final_dir, level: str = "utterance", allow_pickle: bool = False) -> Tuple[List[str], np.ndarray]:
    """(keys, float32 matrix) of a final dir: its npz (no pickle), else its pickle if ``allow_pickle``."""
    if level not in ("utterance", "speaker"):
        raise ValueError("level is 'utterance' or 'speaker'")
    try:
        keys, matrix, _ = _open(final_dir).embeddings(level, allow_pickle)
    except FinalDirError as exc:
        raise ScoreError(str(exc)) from None
    return keys, matrix


class Resolver:
    """Trial token -> row index, or the reason there is none."""

    def __init__(self, table: EmbeddingTable):
        self.table = table
        self.by_key = {k: i for i, k in enumerate(table.keys)}
        self.by_path: Dict[str, List[int]] = {}
        self.datasets = set()
        for record in table.records:
            row = self.by_key.get(record.get("key"))
            if row is None:
                continue
            for name in {record.get("path"), record.get("rel_path")} - {None, ""}:
                self.by_path.setdefault(os.path.normpath(name), []).append(row)
            if record.get("dataset"):
                self.datasets.add(record["dataset"])

    def candidates(self, token: str) -> Iterable[str]:
        yield token
        path = os.path.normpath(token)
        yield path
        if not os.path.isabs(path):
            for root in self.table.data_roots:
                yield os.path.normpath(os.path.join(root, path))
            for dataset in sorted(self.datasets):
                yield os.path.normpath(os.path.join(dataset, path))
                for root in self.table.data_roots:
                    yield os.path.normpath(os.path.join(root, dataset, path))

    def lookup(self, token: str) -> Tuple[Optional[int], str]:
        if token in self.by_key:
            return self.by_key[token], ""
        for name in self.candidates(token):
            rows = self.by_path.get(name)
            if rows and len(set(rows)) == 1:
                return rows[0], ""
            if rows:
                return None, (f"'{token}' is the audio of {len(set(rows))} utterances (segments); "
                              "name them by key")
        for name in self.candidates(token):
            if name in self.table.failures:
                return None, f"'{token}' {self.table.failures[name]}"
        return None, f"'{token}' is neither a key nor an audio path in {self.table.source or 'the embeddings'}"


# --- trials --------------------------------------------------------------------------------
@dataclass
class Trial:
    line: int
    enroll: str
    test: str
    label: Optional[int]  # 1 target, 0 nontarget, None unlabelled


def parse_trial_line(text: str) -> Tuple[str, str, Optional[int]]:
    """``a b target|nontarget``, ``1|0 a b`` or ``a b``; raises ValueError otherwise."""
    parts = text.split()
    if len(parts) == 3 and parts[2].lower() in LABELS:
        return parts[0], parts[1], LABELS[parts[2].lower()]
    if len(parts) == 3 and parts[0] in ("0", "1"):
        return parts[1], parts[2], int(parts[0])
    if len(parts) == 2:
        return parts[0], parts[1], None
    raise ValueError("expected '<a> <b> target|nontarget', '1|0 <a> <b>' or '<a> <b>'")


def read_trials(path) -> List[Trial]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ScoreError(f"trials {path}: cannot read it ({exc})") from None
    trials = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            trials.append(Trial(number, *parse_trial_line(line)))
        except ValueError as exc:
            raise ScoreError(f"{path}:{number}: {exc}, got {line.strip()!r}") from None
    if not trials:
        raise ScoreError(f"trials {path} holds no trials")
    labelled = {t.label is not None for t in trials}
    if len(labelled) > 1:
        first = next(t for t in trials if t.label is None)
        raise ScoreError(f"{path}:{first.line}: has no label while other trials have one")
    return trials


# --- scoring -------------------------------------------------------------------------------
def unit_rows(matrix: np.ndarray, mean: Optional[np.ndarray] = None) -> np.ndarray:
    rows = matrix.astype(np.float64)
    if mean is not None:
        rows = rows - mean
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def cosine_scores(unit: np.ndarray, enroll: np.ndarray, test: np.ndarray, block: int = 65536) -> np.ndarray:
    out = np.empty(len(enroll))
    for start in range(0, len(enroll), block):
        a, b = enroll[start:start + block], test[start:start + block]
        out[start:start + block] = np.einsum("ij,ij->i", unit[a], unit[b])
    return out


def cohort_statistics(unit: np.ndarray, rows: np.ndarray, cohort_unit: np.ndarray, top_n: int,
                      max_cells: int = 1 << 24) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and std (ddof=0) of the ``top_n`` largest cosine scores of each of ``unit[rows]`` against the cohort."""
    top_n = min(top_n, len(cohort_unit))
    means, stds = np.empty(len(rows)), np.empty(len(rows))
    block = max(1, max_cells // max(1, len(cohort_unit)))
    for start in range(0, len(rows), block):
        scores = unit[rows[start:start + block]] @ cohort_unit.T
        top = np.partition(scores, scores.shape[1] - top_n, axis=1)[:, -top_n:]
        means[start:start + block] = top.mean(axis=1)
        stds[start:start + block] = top.std(axis=1)
    return means, stds


def asnorm(raw: np.ndarray, enroll: np.ndarray, test: np.ndarray, unit: np.ndarray, cohort_unit: np.ndarray,
           top_n: int) -> np.ndarray:
    """Adaptive symmetric normalisation of ``raw`` scores of trials (unit[enroll], unit[test])."""
    if min(top_n, len(cohort_unit)) < 2:
        raise ScoreError("AS-norm needs a cohort of at least 2 embeddings and top_n >= 2")
    used = np.unique(np.r_[enroll, test])
    means, stds = cohort_statistics(unit, used, cohort_unit, top_n)
    position = np.searchsorted(used, enroll), np.searchsorted(used, test)
    mu_e, sd_e = means[position[0]], np.maximum(stds[position[0]], 1e-12)
    mu_t, sd_t = means[position[1]], np.maximum(stds[position[1]], 1e-12)
    return 0.5 * ((raw - mu_e) / sd_e + (raw - mu_t) / sd_t)


def score_trials(embeddings: Union[str, Path, EmbeddingTable], trials: Union[str, Path, Sequence],
                 mean_subtraction: bool = False, mean_from: Union[None, str, Path, EmbeddingTable] = None,
                 asnorm_cohort: Union[None, str, Path, EmbeddingTable] = None, asnorm_top_n: int = 300,
                 cohort_level: str = "speaker", allow_pickle: bool = False) -> dict:
    """Score trials; returns the metrics (as in the JSON output), the unscored trials with reasons,
    ``scored_trials`` (the Trial of each scored one) and ``scores`` (a float array aligned with them).

    ``embeddings``: a merged output dir or an EmbeddingTable; ``trials``: a trials file, or a list of
    ``Trial`` / ``(a, b, label)`` tuples (label 1, 0 or None). Final dirs holding only pickles are read
    with ``allow_pickle`` only (unpickling runs code)."""
    def table_of(source, level="utterance"):
        return source if isinstance(source, EmbeddingTable) else EmbeddingTable.from_dir(source, level, allow_pickle)

    table = table_of(embeddings)
    if isinstance(trials, (str, Path)):
        trial_list, trials_name = read_trials(trials), str(trials)
    else:
        trial_list = [t if isinstance(t, Trial) else Trial(i + 1, *t) for i, t in enumerate(trials)]
        trials_name = "<list>"
    resolver = table.index()
    enroll, test, kept, unscored = [], [], [], []
    for trial in trial_list:
        a, why_a = resolver.lookup(trial.enroll)
        b, why_b = resolver.lookup(trial.test)
        if a is None or b is None:
            unscored.append({"line": trial.line, "enroll": trial.enroll, "test": trial.test,
                             "reason": "; ".join(w for w in (why_a, why_b) if w)})
            continue
        enroll.append(a)
        test.append(b)
        kept.append(trial)
    enroll_idx, test_idx = np.array(enroll, dtype=np.int64), np.array(test, dtype=np.int64)

    mean, mean_source = None, None
    if mean_subtraction or mean_from is not None:
        source = table if mean_from is None else (
            table_of(mean_from))
        if not len(source.keys):
            raise ScoreError(f"{source.source}: no embeddings to take a mean from")
        mean = source.matrix.astype(np.float64).mean(axis=0)
        mean_source = source.source
    unit = unit_rows(table.matrix, mean) if len(table.keys) else table.matrix
    raw = cosine_scores(unit, enroll_idx, test_idx) if kept else np.zeros(0)
    normalization = {"mean_subtraction": mean is not None, "mean_from": mean_source, "asnorm": None}
    scores = raw
    if asnorm_cohort is not None and kept:
        cohort = table_of(asnorm_cohort, cohort_level)
        if cohort.matrix.shape[1:] != table.matrix.shape[1:]:
            raise ScoreError(f"cohort {cohort.source} has {cohort.matrix.shape[1]}-d embeddings, the trials' "
                             f"are {table.matrix.shape[1]}-d")
        if asnorm_top_n > len(cohort.keys):
            # not an error (all of the cohort is used), but not what was asked for: say so
            log.warning("warning: --asnorm_top_n %d is larger than the cohort (%d %s embeddings in %s): "
                        "AS-norm uses all %d", asnorm_top_n, len(cohort.keys), cohort_level, cohort.source,
                        len(cohort.keys))
        scores = asnorm(raw, enroll_idx, test_idx, unit, unit_rows(cohort.matrix, mean), asnorm_top_n)
        normalization["asnorm"] = {"cohort": cohort.source, "level": cohort_level,
                                   "top_n": min(asnorm_top_n, len(cohort.keys)), "cohort_size": len(cohort.keys)}

    labels = np.array([t.label for t in kept]) if kept and kept[0].label is not None else None
    result = {"embeddings": table.source, "trials": trials_name, "num_trials": len(kept),
              "num_target": None, "num_nontarget": None, "eer": None, "eer_threshold": None,
              "min_dcf_0.01": None, "min_dcf_0.05": None, "normalization": normalization,
              "num_unscored": len(unscored), "unscored": unscored}
    if labels is not None:
        result["num_target"], result["num_nontarget"] = int(labels.sum()), int(len(labels) - labels.sum())
        if result["num_target"] and result["num_nontarget"]:
            eer, threshold = eer_with_threshold(scores, labels)
            result.update({"eer": round(100.0 * eer, 6), "eer_threshold": threshold,
                           "min_dcf_0.01": round(compute_min_dcf(scores, labels, 0.01), 6),
                           "min_dcf_0.05": round(compute_min_dcf(scores, labels, 0.05), 6)})
    result["scored_trials"], result["scores"] = kept, np.asarray(scores, dtype=np.float64)
    return result


# --- command line --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("speakerlab.score"),
                                description="Cosine scoring of a trial list: EER and minDCF.")
    p.add_argument("--embeddings", required=True, help="merged output dir (utterance_embeddings.npz or .pkl)")
    p.add_argument("--trials", required=True, help="'a b target|nontarget' or '1|0 a b' per line")
    p.add_argument("--output", default=None, help="write the metrics and unscored trials here (JSON)")
    p.add_argument("--score_file", default=None, help="write 'a b score [label]' per scored trial here")
    p.add_argument("--mean_subtraction", action="store_true",
                   help="subtract the mean utterance embedding (of --mean_from, else of --embeddings)")
    p.add_argument("--mean_from", default=None, help="merged output dir whose utterance mean is subtracted")
    p.add_argument("--asnorm_cohort", default=None, help="merged output dir of the AS-norm cohort")
    p.add_argument("--asnorm_top_n", type=int, default=300, help="cohort scores kept per side")
    p.add_argument("--cohort_level", choices=["speaker", "utterance"], default="speaker",
                   help="cohort entries: speaker embeddings (WeSpeaker's choice) or utterance embeddings")
    p.add_argument("--strict", action="store_true", help="exit 1 if any trial could not be scored")
    p.add_argument("--allow_pickle", action="store_true",
                   help="read dirs that hold only pickles (unpickling runs code: only dirs you trust)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.asnorm_top_n < 2:
            raise ScoreError("--asnorm_top_n must be at least 2")
        for name in ("embeddings", "mean_from", "asnorm_cohort"):
            value = getattr(args, name)
            if value is not None and not Path(value).is_dir():
                raise ScoreError(f"--{name} {value} is not a directory")
        result = score_trials(args.embeddings, args.trials, args.mean_subtraction, args.mean_from,
                              args.asnorm_cohort, args.asnorm_top_n, args.cohort_level, args.allow_pickle)
    except ScoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    scores, scored = result.pop("scores"), result.pop("scored_trials")
    if args.score_file:
        with open(args.score_file, "w", encoding="utf-8") as handle:
            for trial, score in zip(scored, scores):
                label = "" if trial.label is None else (" target" if trial.label else " nontarget")
                handle.write(f"{trial.enroll} {trial.test} {score:.6f}{label}\n")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.output).with_name(f".{Path(args.output).name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, args.output)
    shown = {k: result[k] for k in ("num_trials", "num_target", "num_nontarget", "eer", "min_dcf_0.01",
                                    "min_dcf_0.05", "num_unscored")}
    print(json.dumps(shown))
    if result["num_unscored"]:
        log.warning("%d of %d trials could not be scored (%s):", result["num_unscored"],
                    result["num_unscored"] + result["num_trials"],
                    f"all listed in {args.output}" if args.output else "--output FILE lists them all")
        for entry in result["unscored"][:10]:
            log.warning("  line %d: %s", entry["line"], entry["reason"])
    if result["num_trials"] == 0:
        print("error: none of the trials could be scored", file=sys.stderr)
        return 1
    if result["num_target"] is not None and result["eer"] is None:
        log.warning("EER/minDCF need both target and nontarget trials among the scored ones")
    return 1 if args.strict and result["num_unscored"] else 0


if __name__ == "__main__":
    sys.exit(main())
