"""Serializers of the final files; finaldir.py names the files and decides which are written.

- pickles: the seed's schemas, ``{key: {embedding, dataset, speaker_id, ...}}``. Unpickling can run
  arbitrary code: load pickles only from a source you trust, else use npz.
- npz: ``keys`` (str) and ``embeddings`` (float32, N x D); load with ``np.load(path, allow_pickle=False)``.
- kaldi: ark/scp via kaldiio. Kaldi keys cannot hold whitespace: such characters become ``_`` there.
"""
import os
import re
from pathlib import Path

import numpy as np

from speakerlab.store import atomic_write_npz, atomic_write_pickle

SPEAKER_EXTRA_FIELDS = ("duration_s", "mean_cosine", "min_cosine", "outliers")


def write_pickles(utt_path: Path, spk_path: Path, keys, matrix, utt_list, speaker_keys, speaker_matrix,
                  spk_list) -> None:
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
    atomic_write_pickle(utt_path, utterances)
    atomic_write_pickle(spk_path, speakers)


def write_npz(path: Path, keys, matrix) -> None:
    atomic_write_npz(path, keys=np.array(keys, dtype=str), embeddings=np.asarray(matrix).astype(np.float32))


def kaldi_key(key: str) -> str:
    return re.sub(r"\s", "_", key)


def write_kaldi(ark: Path, scp: Path, final_ark: Path, names, rows) -> dict:
    """Write ``ark``/``scp``; the scp names the ark as ``final_ark`` (where it will live). Returns the
    keys renamed for Kaldi."""
    import kaldiio
    mapped = [kaldi_key(k) for k in names]
    if len(set(mapped)) != len(mapped):
        raise ValueError(f"keys collide once whitespace is replaced for Kaldi ({ark.name})")
    renamed = {k: m for k, m in zip(names, mapped) if k != m}
    tmp_ark, tmp_scp = ark.with_name(f".{ark.name}.tmp{os.getpid()}"), scp.with_name(f".{scp.name}.tmp{os.getpid()}")
    try:
        with kaldiio.WriteHelper(f"ark,scp:{tmp_ark},{tmp_scp}") as writer:
            for name, row in zip(mapped, rows):
                writer(name, np.asarray(row, dtype=np.float32))
        # the scp names the ark by path: point it at the final name before renaming
        text = Path(tmp_scp).read_text(encoding="utf-8").replace(str(tmp_ark), str(final_ark))
        Path(tmp_scp).write_text(text, encoding="utf-8")
        os.replace(tmp_ark, ark)
        os.replace(tmp_scp, scp)
    except OSError as exc:
        for tmp in (tmp_ark, tmp_scp):
            tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(ark)) from None
    return renamed
