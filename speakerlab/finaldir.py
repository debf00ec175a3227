"""The final dir of a merge: the only code that knows its files.

A final dir is written whole: merge builds it in a temporary dir beside the target and swaps it in,
so no file of an earlier merge survives. Its last file is the completeness record, ``complete.json``:
every other file with its size and sha256, the counts, and the run id(s) of the run dirs it was
merged from. Readers (the API, ``score``, ``report``, ``example_usage.py``, clean-up) open a final dir
with ``FinalDir.open``, which refuses one whose record is missing or disagrees with the files.

Files (``--formats``): pkl (always) ``utterance_embeddings.pkl``, ``speaker_embeddings.pkl``;
``utterance_list.json``, ``speaker_list.json``, ``failures.json``, ``summary.json`` (always); npz
``utterance_embeddings.npz``, ``speaker_embeddings.npz``; kaldi ``xvector.ark/scp``, ``spk_xvector.ark/scp``.
"""
import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from speakerlab import formats as formats_mod
from speakerlab.store import atomic_write_json, is_temp_name
from speakerlab.zoo import sha256_of

RECORD = "complete.json"
SUMMARY = "summary.json"
UTTERANCE_LIST = "utterance_list.json"
SPEAKER_LIST = "speaker_list.json"
FAILURES = "failures.json"
PICKLES = {"utterance": "utterance_embeddings.pkl", "speaker": "speaker_embeddings.pkl"}
NPZ = {"utterance": "utterance_embeddings.npz", "speaker": "speaker_embeddings.npz"}
KALDI = {"utterance": ("xvector.ark", "xvector.scp"), "speaker": ("spk_xvector.ark", "spk_xvector.scp")}
KNOWN = {RECORD, SUMMARY, UTTERANCE_LIST, SPEAKER_LIST, FAILURES, *PICKLES.values(), *NPZ.values(),
         *(name for pair in KALDI.values() for name in pair)}
LEVELS = ("utterance", "speaker")


class FinalDirError(ValueError):
    """A final dir that cannot be trusted or written: one line naming what is wrong."""


class PickleRefused(FinalDirError):
    """Only pickles hold the embeddings, and unpickling was not allowed."""


# --- writing -------------------------------------------------------------------------------
def check_replaceable(target: Path) -> None:
    """A merge may replace ``target`` only if it is absent, empty or holds nothing but final-dir files."""
    if not target.exists():
        return
    if not target.is_dir() or target.is_symlink():
        raise FinalDirError(f"{target} exists and is not a plain directory (a file or a symlink); choose another "
                            "--output_dir")
    foreign = sorted(p.name for p in target.iterdir() if p.name not in KNOWN and not is_temp_name(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise FinalDirError(f"{target} holds files a merge did not write ({shown}); refusing to replace it: "
                            "choose another --output_dir")


def write(target, formats: Sequence[str], keys, matrix, utt_list, speaker_keys, speaker_matrix, spk_list,
          failures, summary: dict, runs: Sequence[dict] = ()) -> None:
    """Write a final dir: built beside ``target``, the record last, then swapped in whole.

    ``runs``: ``[{"input_dir", "run_ids"}]`` of the run dirs merged (clean-up checks them).
    """
    target = Path(os.path.abspath(target))  # "." and "x/" have a name to build beside
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(target)
    build = target.parent / f".{target.name}.tmp{os.getpid()}"
    shutil.rmtree(build, ignore_errors=True)
    try:
        build.mkdir()
        files = _write_files(build, target, formats, keys, matrix, utt_list, speaker_keys, speaker_matrix,
                             spk_list, failures, summary)
        record = {"format": 1, "created": datetime.now(timezone.utc).isoformat(),
                  "files": {name: {"bytes": (build / name).stat().st_size, "sha256": sha256_of(build / name)}
                            for name in files},
                  "counts": {"utterances": len(keys), "speakers": len(speaker_keys), "failures": len(failures)},
                  "run_ids": sorted({i for run in runs for i in run.get("run_ids", [])}),
                  "runs": [dict(run) for run in runs]}
        atomic_write_json(build / RECORD, record)
        _swap_in(build, target)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise


def _write_files(out: Path, final: Path, formats, keys, matrix, utt_list, speaker_keys, speaker_matrix, spk_list,
                 failures, summary) -> List[str]:
    formats_mod.write_pickles(out / PICKLES["utterance"], out / PICKLES["speaker"], keys, matrix, utt_list,
                              speaker_keys, speaker_matrix, spk_list)
    atomic_write_json(out / UTTERANCE_LIST, utt_list)
    atomic_write_json(out / SPEAKER_LIST, spk_list)
    atomic_write_json(out / FAILURES, failures)
    files = [PICKLES["utterance"], PICKLES["speaker"], UTTERANCE_LIST, SPEAKER_LIST, FAILURES]
    if "npz" in formats:
        formats_mod.write_npz(out / NPZ["utterance"], keys, matrix)
        formats_mod.write_npz(out / NPZ["speaker"], speaker_keys, speaker_matrix)
        files += [NPZ["utterance"], NPZ["speaker"]]
    if "kaldi" in formats:
        renamed = {}
        for level, names, rows in (("utterance", keys, matrix), ("speaker", speaker_keys, speaker_matrix)):
            ark, scp = KALDI[level]
            renamed.update(formats_mod.write_kaldi(out / ark, out / scp, final.absolute() / ark, names, rows))
            files += [ark, scp]
        if renamed:
            summary["kaldi_renamed_keys"] = renamed
    summary["files"] = files
    atomic_write_json(out / SUMMARY, summary)
    return files + [SUMMARY]


def _remove_dead_builds(target: Path) -> None:
    """Build and old dirs of merges into ``target`` that were killed (their process is gone)."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"(?:old\.)?tmp(\d+)")
    for entry in target.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink():
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # a live merge's
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(entry, ignore_errors=True)


def _swap_in(build: Path, target: Path) -> None:
    if not target.exists():
        os.replace(build, target)
        return
    old = target.parent / f".{target.name}.old.tmp{os.getpid()}"
    os.replace(target, old)
    try:
        os.replace(build, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)  # only final-dir files (check_replaceable)


# --- reading -------------------------------------------------------------------------------
class FinalDir:
    """A verified final dir. ``open`` checks the record; the readers below go through it."""

    def __init__(self, path: Path, record: dict):
        self.path = Path(path)
        self.record = record
        self._summary = None

    @classmethod
    def open(cls, path, check_digests: bool = False) -> "FinalDir":
        path = Path(path)
        if not path.is_dir():
            raise FinalDirError(f"{path} is not a directory")
        record_path = path / RECORD
        if not record_path.is_file():
            raise FinalDirError(f"{path} is not a complete final dir: {RECORD} is missing (the merge did not finish, "
                                "or the dir was not made by merge_embeddings.py); rerun the merge")
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            files = dict(record["files"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FinalDirError(f"{record_path} is unreadable ({exc}); rerun the merge") from None
        problem = _disagreement(path, files, check_digests)
        if problem:
            raise FinalDirError(f"{path} does not match its {RECORD}: {problem}; rerun the merge")
        return cls(path, record)

    # --- what is there ---
    def has(self, name: str) -> bool:
        return name in self.record["files"]

    def has_npz(self, level: str = "utterance") -> bool:
        return self.has(NPZ[level])

    def has_pickle(self, level: str = "utterance") -> bool:
        return self.has(PICKLES[level])

    def kaldi_scp(self, level: str = "utterance") -> Optional[Path]:
        return self.path / KALDI[level][1] if self.has(KALDI[level][1]) else None

    @property
    def run_ids(self) -> List[str]:
        return list(self.record.get("run_ids", []))

    @property
    def runs(self) -> List[dict]:
        return list(self.record.get("runs", []))

    # --- contents ---
    def _json(self, name: str):
        try:
            with open(self.path / name, encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError) as exc:
            raise FinalDirError(f"{self.path / name}: unreadable ({exc})") from None

    def summary(self) -> dict:
        if self._summary is None:
            self._summary = self._json(SUMMARY)
        return self._summary

    def utterance_list(self) -> List[dict]:
        return self._json(UTTERANCE_LIST)

    def speaker_list(self) -> List[dict]:
        return self._json(SPEAKER_LIST)

    def failures(self) -> List[dict]:
        return self._json(FAILURES)

    def read_npz(self, level: str = "utterance") -> Tuple[List[str], np.ndarray]:
        path = self.path / NPZ[level]
        try:
            with np.load(path, allow_pickle=False) as data:
                return [str(k) for k in data["keys"]], np.asarray(data["embeddings"], dtype=np.float32)
        except Exception as exc:  # a damaged zip raises several kinds of errors
            raise FinalDirError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None

    def read_pickle(self, level: str = "utterance", allow_pickle: bool = False) -> Dict[str, dict]:
        """The seed's pickle of ``level``; unpickling runs code, so only with ``allow_pickle``."""
        path = self.path / PICKLES[level]
        if not allow_pickle:
            raise PickleRefused(f"{self.path} holds the {level} embeddings only as a pickle ({path.name}), and "
                                "unpickling can run code: pass allow_pickle=True (--allow_pickle) if you trust "
                                "this dir, or merge again with --formats pkl,npz")
        import pickle
        try:
            with open(path, "rb") as handle:
                return pickle.load(handle)
        except Exception as exc:
            raise FinalDirError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None

    def embeddings(self, level: str = "utterance", allow_pickle: bool = False):
        """(keys, float32 matrix, pickle entries or None): the npz when there is one, else the pickle
        (only with ``allow_pickle``)."""
        if self.has_npz(level):
            keys, matrix = self.read_npz(level)
            return keys, matrix, None
        entries = self.read_pickle(level, allow_pickle)
        keys = sorted(entries)
        if not keys:
            return [], np.zeros((0, 0), np.float32), entries
        return keys, np.stack([np.asarray(entries[k]["embedding"], np.float32) for k in keys]), entries


def _disagreement(path: Path, files: Dict[str, dict], check_digests: bool) -> str:
    for name, info in sorted(files.items()):
        if name not in KNOWN or name == RECORD:
            return f"it lists {name!r}, which is not a final-dir file"
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != info.get("bytes"):
            return f"{name} has {size} bytes, the record says {info.get('bytes')} (changed since the merge)"
        if check_digests and sha256_of(file) != info.get("sha256"):
            return f"{name} has changed since the merge (sha256 differs)"
    for entry in sorted(path.iterdir()):
        if entry.name in KNOWN and entry.name != RECORD and entry.name not in files:
            return f"{entry.name} is not part of the recorded merge (a file of an earlier merge?)"
    return ""

