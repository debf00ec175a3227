"""The scan file: the utterance list in columns, in groups of rows, so a rank reads only its rows.

A zip of ``.npy`` members (``np.load`` opens it, ``allow_pickle=False``), deflated:

    meta                 JSON: data_root, source, ignored, errors, renames, counts, keys_sha1, scan_id,
                         whether headers were read, and the shard bounds of the world size it was cut for
    speakers.dataset / .speaker / .key     the distinct (dataset, speaker, speaker key), once each
    g<G>.spk             per row: index into the speaker table (int32)
    g<G>.utt / .key / .path / .rel / .err  strings: UTF-8 bytes (``.txt``) + lengths (``.len``);
                         ``key`` is empty when it is ``<speaker key>_<utterance>``, ``path`` when it is
                         ``data_root/rel_path``
    g<G>.rate / .samples / .chan / .start / .end   header fields and segments (NaN: none)

Rows are in key order, ``GROUP_ROWS`` per group; rank r's shard is the contiguous row range
``bounds[r]:bounds[r+1]`` (``data.shard_bounds``), so it reads only the groups that hold its rows.
About 15 MB per million files (a tree of typical names), against 163 MB for the seed's JSON.
"""
import json
import os
import uuid
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from speakerlab.data import ScanResult, Utterance, keys_digest

GROUP_ROWS = 1 << 16
FORMAT = "speakerlab-scan-1"
STRINGS = ("utt", "key", "path", "rel", "err")
HEADERS = ("rate", "samples", "chan", "err")


# --- columns -------------------------------------------------------------------------------
def encode_strings(values: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    data = [v.encode("utf-8", "surrogatepass") for v in values]
    lengths = np.fromiter((len(d) for d in data), dtype=np.int64, count=len(data))
    return np.frombuffer(b"".join(data), dtype=np.uint8), lengths.astype(np.uint32)


def decode_strings(blob: np.ndarray, lengths: np.ndarray) -> List[str]:
    raw = blob.tobytes()
    ends = np.cumsum(lengths, dtype=np.int64)
    starts = (ends - np.asarray(lengths, dtype=np.int64)).tolist()
    ends = ends.tolist()
    if raw.isascii():  # byte offsets are character offsets: slice one decoded string
        text = raw.decode("ascii")
        return [text[a:b] for a, b in zip(starts, ends)]
    return [raw[a:b].decode("utf-8", "surrogatepass") for a, b in zip(starts, ends)]


def _write_member(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    with archive.open(name + ".npy", "w", force_zip64=True) as handle:
        np.lib.format.write_array(handle, np.ascontiguousarray(array), allow_pickle=False)


def _write_strings(archive, name: str, values: Sequence[str]) -> None:
    blob, lengths = encode_strings(values)
    _write_member(archive, name + ".txt", blob)
    _write_member(archive, name + ".len", lengths)


# --- writing -------------------------------------------------------------------------------
def save(scan: ScanResult, path, headers_read: bool = True, shard: Optional[Tuple[int, List[int]]] = None,
         scan_id: Optional[str] = None, compress: bool = True) -> dict:
    """Write ``scan`` to ``path`` (atomically: a temporary name, then renamed). ``shard``: (world,
    bounds). ``compress`` False: members stored as they are (faster; for the transient walk file).
    Returns the meta record written."""
    path = Path(path)
    utts = scan.utterances
    table: Dict[Tuple[str, str, str], int] = {}
    for utt in utts:
        table.setdefault((utt.dataset, utt.speaker, utt.spk_key), len(table))
    root = scan.data_root.rstrip("/")
    meta = {"format": FORMAT, "data_root": scan.data_root, "source": scan.source or {"type": "tree", "path": scan.data_root},
            "ignored": scan.ignored, "ignored_examples": scan.ignored_examples, "errors": scan.errors,
            "renames": scan.renames, "count": len(utts), "group_rows": GROUP_ROWS, "speakers": len(table),
            "keys_sha1": keys_digest(utts), "scan_id": scan_id or uuid.uuid4().hex, "headers_read": headers_read,
            "shard_world": shard[0] if shard else None, "shard_bounds": list(map(int, shard[1])) if shard else None}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED,
                             allowZip64=True) as archive:
            _write_member(archive, "meta", np.frombuffer(json.dumps(meta, ensure_ascii=False).encode("utf-8"),
                                                         dtype=np.uint8))
            names = list(table)
            _write_strings(archive, "speakers.dataset", [n[0] for n in names])
            _write_strings(archive, "speakers.speaker", [n[1] for n in names])
            _write_strings(archive, "speakers.key", [n[2] for n in names])
            for group, first in enumerate(range(0, len(utts), GROUP_ROWS)):
                rows = utts[first:first + GROUP_ROWS]
                prefix = f"g{group}."
                _write_member(archive, prefix + "spk", np.array([table[(u.dataset, u.speaker, u.spk_key)]
                                                                 for u in rows], dtype=np.int32))
                _write_strings(archive, prefix + "utt", [u.utterance for u in rows])
                _write_strings(archive, prefix + "key", ["" if u.key == f"{u.speaker_key}_{u.utterance}" else u.key
                                                         for u in rows])
                _write_strings(archive, prefix + "path", ["" if u.path == f"{root}/{u.rel_path}" else u.path
                                                          for u in rows])
                _write_strings(archive, prefix + "rel", [u.rel_path for u in rows])
                _write_header_columns(archive, prefix, rows)
                _write_member(archive, prefix + "start", np.array([np.nan if u.start is None else u.start
                                                                   for u in rows], dtype=np.float64))
                _write_member(archive, prefix + "end", np.array([np.nan if u.end is None else u.end
                                                                 for u in rows], dtype=np.float64))
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise
    return meta


def header_columns(rows: Sequence[Utterance]) -> Dict[str, object]:
    return {"rate": np.array([u.sample_rate for u in rows], dtype=np.int32),
            "samples": np.array([u.num_samples for u in rows], dtype=np.int64),
            "chan": np.array([u.channels for u in rows], dtype=np.int16),
            "err": [u.header_error for u in rows]}


def _write_header_columns(archive, prefix: str, rows) -> None:
    columns = header_columns(rows)
    for name in ("rate", "samples", "chan"):
        _write_member(archive, prefix + name, columns[name])
    _write_strings(archive, prefix + "err", columns["err"])


# --- reading -------------------------------------------------------------------------------
# The record's fields and the JSON types a reader relies on: valid JSON of another shape (a damaged or
# hand-edited file) is "unreadable", never an AttributeError deep in a reader.
META_TYPES = {"data_root": (str, type(None)), "source": (dict, type(None)), "ignored": (int, dict, list),
              "errors": list, "renames": list, "count": int, "group_rows": int}


def check_meta(meta) -> None:
    if not isinstance(meta, dict):
        raise ValueError(f"the scan record is a {type(meta).__name__}, not an object")
    for name, types in META_TYPES.items():
        if name in meta and not isinstance(meta[name], types):
            raise ValueError(f"the scan record's {name!r} is a {type(meta[name]).__name__}")


class ScanFile:
    """An open scan file: meta at once, rows on demand."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self._npz = np.load(self.path, allow_pickle=False)
        except (zipfile.BadZipFile, EOFError) as exc:
            raise ValueError(f"not a scan file ({exc})") from None
        try:
            self.meta = json.loads(self._npz["meta"].tobytes().decode("utf-8"))
            check_meta(self.meta)
            if self.meta.get("format") != FORMAT:
                raise ValueError(f"unknown scan format {self.meta.get('format')!r}")
            self.count = int(self.meta["count"])
            self.group_rows = int(self.meta["group_rows"])
            self._speakers = None
        except BaseException:
            self._npz.close()
            raise

    def close(self) -> None:
        self._npz.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _strings(self, name: str) -> List[str]:
        return decode_strings(self._npz[name + ".txt"], self._npz[name + ".len"])

    def speakers(self) -> List[Tuple[str, str, str]]:
        if self._speakers is None:
            self._speakers = list(zip(self._strings("speakers.dataset"), self._strings("speakers.speaker"),
                                      self._strings("speakers.key")))
        return self._speakers

    def column(self, name: str, start: int = 0, stop: Optional[int] = None):
        """One column over rows start:stop (a list for strings, an array otherwise)."""
        stop = self.count if stop is None else min(stop, self.count)
        parts = []
        for group in range(start // self.group_rows, (stop - 1) // self.group_rows + 1 if stop > start else 0):
            base = group * self.group_rows
            lo, hi = max(start, base) - base, min(stop, base + self.group_rows) - base
            value = self._strings(f"g{group}.{name}") if name in STRINGS else self._npz[f"g{group}.{name}"]
            parts.append(value[lo:hi])
        if name in STRINGS:
            return [s for part in parts for s in part]
        return np.concatenate(parts) if parts else np.zeros(0)

    def durations(self) -> np.ndarray:
        """Seconds per row, 0 where the header could not be read or is implausible (as Utterance.duration)."""
        out = np.zeros(self.count)
        for first in range(0, self.count, self.group_rows):
            stop = min(self.count, first + self.group_rows)
            rate = self.column("rate", first, stop).astype(np.float64)
            samples = self.column("samples", first, stop).astype(np.float64)
            bad = np.array([bool(e) for e in self.column("err", first, stop)], dtype=bool)
            seconds = np.divide(samples, rate, out=np.zeros_like(samples), where=rate > 0)
            seconds[bad] = 0.0
            out[first:stop] = seconds
        return out

    def rows(self, start: int = 0, stop: Optional[int] = None) -> List[Utterance]:
        """Utterances of rows start:stop."""
        stop = self.count if stop is None else min(stop, self.count)
        out: List[Utterance] = []
        speakers = self.speakers()
        root = self.meta["data_root"].rstrip("/")
        for first in range(start - start % self.group_rows if stop > start else stop, stop, self.group_rows):
            lo, hi = max(start, first), min(stop, first + self.group_rows)
            cols = {name: self.column(name, lo, hi) for name in
                    ("spk", "utt", "key", "path", "rel", "err", "rate", "samples", "chan", "start", "end")}
            rates = {int(r): int(r) for r in np.unique(cols["rate"])}  # one int object per rate, not per row
            for i in range(hi - lo):
                dataset, speaker, spk_key = speakers[int(cols["spk"][i])]
                utterance, rel = cols["utt"][i], cols["rel"][i]
                start_s, end_s = float(cols["start"][i]), float(cols["end"][i])
                out.append(Utterance(
                    key=cols["key"][i] or f"{spk_key or f'{dataset}_{speaker}'}_{utterance}", dataset=dataset,
                    speaker=speaker, utterance=utterance, path=cols["path"][i] or f"{root}/{rel}", rel_path=rel,
                    start=None if start_s != start_s else start_s, end=None if end_s != end_s else end_s,
                    sample_rate=rates[int(cols["rate"][i])], num_samples=int(cols["samples"][i]),
                    channels=int(cols["chan"][i]), header_error=cols["err"][i], spk_key=spk_key))
        return out

    def result(self, utterances: Optional[List[Utterance]] = None) -> ScanResult:
        """A ScanResult with this file's meta and ``utterances`` (all rows when None)."""
        meta = self.meta
        return ScanResult(meta["data_root"], self.rows() if utterances is None else utterances,
                          meta.get("ignored", {}), meta.get("ignored_examples", []),
                          meta.get("source") or {"type": "tree", "path": meta["data_root"]},
                          meta.get("errors", []), meta.get("renames", []), dict(meta))

    def shard(self, rank: int, world: int) -> ScanResult:
        """Rank ``rank``'s rows (``meta["shard_bounds"]``, cut for ``world`` ranks) as a ScanResult."""
        if self.meta.get("shard_world") != world:
            raise ValueError(f"the scan was cut into shards for {self.meta.get('shard_world')} ranks, not {world}")
        bounds = self.meta["shard_bounds"]
        return self.result(self.rows(bounds[rank], bounds[rank + 1]))


def load(path) -> ScanResult:
    with ScanFile(path) as scan:
        return scan.result()


def save_headers(path, start: int, rows: Sequence[Utterance], run_id: str, error: str = "") -> None:
    """One rank's header reads (rows start:start+len(rows)) for the scan's gather, atomically;
    ``error``: why the rank could not read them."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    columns = header_columns(rows)
    blob, lengths = encode_strings(columns["err"])
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, start=np.array(start), run_id=np.frombuffer(run_id.encode(), dtype=np.uint8),
                     rate=columns["rate"], samples=columns["samples"], chan=columns["chan"],
                     err_txt=blob, err_len=lengths, error=np.frombuffer(error.encode("utf-8"), dtype=np.uint8))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None


def load_headers(path, run_id: Optional[str] = None) -> Optional[Tuple[int, Dict[str, object]]]:
    """(first row, columns) of a rank's header file, or None if absent, unreadable or of another run."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if run_id is not None and data["run_id"].tobytes().decode() != run_id:
                return None
            return int(data["start"]), {"rate": data["rate"], "samples": data["samples"], "chan": data["chan"],
                                        "err": decode_strings(data["err_txt"], data["err_len"]),
                                        "error": data["error"].tobytes().decode("utf-8") if "error" in data.files else ""}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None


def apply_headers(rows: Sequence[Utterance], columns: Dict[str, object]) -> None:
    for i, utt in enumerate(rows):
        utt.sample_rate = int(columns["rate"][i])
        utt.num_samples = int(columns["samples"][i])
        utt.channels = int(columns["chan"][i])
        utt.header_error = columns["err"][i]


