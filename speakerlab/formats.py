"""Writers of the final files. Each file is written atomically; summary.json goes last, so its
presence means the directory is complete.

- pkl (always): ``utterance_embeddings.pkl``, ``speaker_embeddings.pkl`` (the seed's schemas),
  ``utterance_list.json``, ``speaker_list.json``, ``failures.json``, ``summary.json``.
  Unpickling can run arbitrary code: load pickles only from a source you trust, else use npz.
- npz: ``utterance_embeddings.npz`` / ``speaker_embeddings.npz`` with ``keys`` (str) and
  ``embeddings`` (float32, N x D); load with ``np.load(path, allow_pickle=False)``.
- ``failures.json``: every input not embedded, ``{key, path, stage, reason}``; ``stage`` is decode,
  validate, resample, model, or scan (``key`` null: a directory that could not be listed, a name
  that is not UTF-8, a file whose key another file took).
- kaldi: ``xvector.ark/scp`` (utterances) and ``spk_xvector.ark/scp`` (speakers) via kaldiio.
  Kaldi keys cannot hold whitespace: such characters become ``_`` there (listed in summary).
"""
import re
from pathlib import Path
from typing import List

import numpy as np

from speakerlab.store import atomic_write_json, atomic_write_npz, atomic_write_pickle

SPEAKER_EXTRA_FIELDS = ("duration_s", "mean_cosine", "min_cosine", "outliers")


def write_pickles(out: Path, keys, matrix, utt_list, speaker_keys, speaker_matrix, spk_list) -> None:
    utterances = {}
    for key, row, record in zip(keys, matrix, utt_list):
        utterances[key] = {"embedding": row.copy(), "dataset": record["dataset"], "speaker_id": record["speaker_id"],
                           "utterance_id": record["utterance_id"], "path": record["path"]}
    speakers = {}
    for key, row, record in zip(speaker_keys, speaker_matrix, spk_list):
        entry = {"embedding": row.copy(), "dataset": record["dataset"], "speaker_id": record["speaker_id"],
                 "num_utterances": record["num_utterances"]}
        entry.update({f: record[f] for f in SPEAKER_EXTRA_FIELDS if f in record})
        speakers[key] = entry
    atomic_write_pickle(out / "utterance_embeddings.pkl", utterances)
    atomic_write_pickle(out / "speaker_embeddings.pkl", speakers)


def write_npz(out: Path, keys, matrix, speaker_keys, speaker_matrix) -> None:
    atomic_write_npz(out / "utterance_embeddings.npz", keys=np.array(keys, dtype=str),
                     embeddings=matrix.astype(np.float32))
    atomic_write_npz(out / "speaker_embeddings.npz", keys=np.array(speaker_keys, dtype=str),
                     embeddings=speaker_matrix.astype(np.float32))


def kaldi_key(key: str) -> str:
    return re.sub(r"\s", "_", key)


def write_kaldi(out: Path, keys, matrix, speaker_keys, speaker_matrix) -> dict:
    import os
    import kaldiio
    renamed = {}
    for stem, names, rows in (("xvector", keys, matrix), ("spk_xvector", speaker_keys, speaker_matrix)):
        mapped = [kaldi_key(k) for k in names]
        if len(set(mapped)) != len(mapped):
            raise ValueError(f"keys collide once whitespace is replaced for Kaldi ({stem})")
        renamed.update({k: m for k, m in zip(names, mapped) if k != m})
        ark, scp = out / f"{stem}.ark", out / f"{stem}.scp"
        tmp_ark, tmp_scp = out / f".{stem}.ark.tmp", out / f".{stem}.scp.tmp"
        with kaldiio.WriteHelper(f"ark,scp:{tmp_ark},{tmp_scp}") as writer:
            for name, row in zip(mapped, rows):
                writer(name, np.asarray(row, dtype=np.float32))
        # the scp names the ark by path: point it at the final name before renaming
        text = Path(tmp_scp).read_text(encoding="utf-8").replace(str(tmp_ark), str(ark))
        Path(tmp_scp).write_text(text, encoding="utf-8")
        os.replace(tmp_ark, ark)
        os.replace(tmp_scp, scp)
    return renamed


def write_all(out: Path, formats: List[str], keys, matrix, utt_list, speaker_keys, speaker_matrix, spk_list,
              failures, summary) -> None:
    out = Path(out)
    (out / "summary.json").unlink(missing_ok=True)  # absent until everything else is in place
    write_pickles(out, keys, matrix, utt_list, speaker_keys, speaker_matrix, spk_list)
    atomic_write_json(out / "utterance_list.json", utt_list)
    atomic_write_json(out / "speaker_list.json", spk_list)
    atomic_write_json(out / "failures.json", failures)
    files = ["utterance_embeddings.pkl", "speaker_embeddings.pkl", "utterance_list.json", "speaker_list.json",
             "failures.json"]
    if "npz" in formats:
        write_npz(out, keys, matrix, speaker_keys, speaker_matrix)
        files += ["utterance_embeddings.npz", "speaker_embeddings.npz"]
    if "kaldi" in formats:
        renamed = write_kaldi(out, keys, matrix, speaker_keys, speaker_matrix)
        files += ["xvector.ark", "xvector.scp", "spk_xvector.ark", "spk_xvector.scp"]
        if renamed:
            summary["kaldi_renamed_keys"] = renamed
    summary["files"] = files
    atomic_write_json(out / "summary.json", summary)
