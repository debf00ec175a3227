"""Utterance lists from a manifest (CSV/TSV/JSONL) or a Kaldi data dir, instead of a directory tree.

Both give the same ``ScanResult`` as ``data.scan_tree`` (keys ``<dataset>_<speaker>_<utterance>``), so
everything downstream (sharding, resume, merge, scoring) treats all sources alike. Either may name a
segment of a longer recording (start/end seconds): only those samples are read.

Manifest columns (a header row for CSV/TSV, field names for JSONL; other columns are ignored):
``path`` (required; relative paths are resolved against the manifest's folder, or ``data_root``),
``speaker`` (required), ``dataset`` (required unless a default is given), ``utterance`` (optional,
default: the file name without extension, plus the segment's times in ms when it is a segment),
``start`` / ``end`` (optional seconds; an empty ``end`` means the end of the file).

Kaldi data dir: ``wav.scp`` (``<recording> <path>``) and ``utt2spk`` (``<utterance> <speaker>``), and
optionally ``segments`` (``<utterance> <recording> <start> <end>``, end -1 = to the end of the file).
The utterance id is Kaldi's; the dataset is a given name or the dir's name. Relative paths in wav.scp
are resolved against ``data_root``, or the current directory (as Kaldi's tools do). Pipe entries
(``cmd |``) and Kaldi ark offsets are not supported: convert such audio to files first.
"""
import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from speakerlab.progname import prog
from speakerlab.data import AUDIO_EXTENSIONS, DataError, ScanResult, Utterance, assign_keys, scan_tree

MANIFEST_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
ALIASES = {"speaker_id": "speaker", "utterance_id": "utterance", "utt_id": "utterance"}


# --- sources -------------------------------------------------------------------------------
def describe_source(data_root=None, manifest=None, kaldi_dir=None, dataset=None) -> dict:
    """What a run reads, as stored in scan.json and the rank fingerprints. Exactly one of
    ``data_root`` (a tree), ``manifest`` or ``kaldi_dir``; ``data_root`` with the other two is the
    base of relative paths."""
    if manifest is not None and kaldi_dir is not None:
        raise DataError("give either a manifest or a Kaldi data dir, not both")
    if manifest is None and kaldi_dir is None:
        if data_root is None:
            raise DataError("no input: give a data root, a manifest or a Kaldi data dir")
        if dataset is not None:
            raise DataError("a dataset name applies to a manifest or a Kaldi dir; a tree's datasets are its "
                            "top-level folders")
        root = Path(data_root).absolute()
        if not root.is_dir():
            raise DataError(f"data_root {root} is not a directory")
        return {"type": "tree", "path": str(root)}
    if data_root is not None and not Path(data_root).is_dir():
        raise DataError(f"data_root {Path(data_root).absolute()} is not a directory")
    if manifest is not None:
        path = Path(manifest).absolute()
        if not path.is_file():
            raise DataError(f"manifest {path} is not a file")
        manifest_format(path)
        base = Path(data_root).absolute() if data_root is not None else path.parent
        return {"type": "manifest", "path": str(path), "base": str(base), "dataset": dataset,
                "sha1": files_sha1([path])}
    directory = Path(kaldi_dir).absolute()
    if not directory.is_dir():
        raise DataError(f"Kaldi data dir {directory} is not a directory")
    for name in ("wav.scp", "utt2spk"):
        if not (directory / name).is_file():
            raise DataError(f"Kaldi data dir {directory} has no {name}")
    base = Path(data_root).absolute() if data_root is not None else Path.cwd()
    return {"type": "kaldi", "path": str(directory), "base": str(base), "dataset": dataset or directory.name,
            "sha1": files_sha1(kaldi_files(directory))}


def kaldi_files(directory: Path) -> List[Path]:
    return [directory / n for n in ("wav.scp", "utt2spk", "segments") if (directory / n).is_file()]


def files_sha1(paths: Iterable[Path]) -> str:
    digest = hashlib.sha1()
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def source_changed(old: dict, new: dict) -> str:
    """'' when ``old`` (from scan.json) describes the same input as ``new``, else how they differ."""
    if old.get("type") != new.get("type") or old.get("path") != new.get("path"):
        return f"it holds a scan of {old.get('type')} {old.get('path')}, not {new['type']} {new['path']}"
    for field in ("base", "dataset"):
        if old.get(field) != new.get(field):
            return f"its {field} was {old.get(field)!r}, now {new.get(field)!r}"
    if old.get("sha1") != new.get("sha1"):
        return f"{new['path']} has changed since it was scanned"
    return ""


def scan_source(source: dict) -> ScanResult:
    if source["type"] == "tree":
        scan = scan_tree(source["path"])
    elif source["type"] == "manifest":
        scan = read_manifest(source["path"], source["base"], source.get("dataset"))
    elif source["type"] == "kaldi":
        scan = read_kaldi_dir(source["path"], source["base"], source["dataset"])
    else:
        raise DataError(f"unknown input type {source['type']!r}")
    scan.source = dict(source)
    return scan


# --- shared helpers ------------------------------------------------------------------------
def resolve(path_text: str, base: Path) -> Tuple[str, str]:
    """(absolute path, path relative to base when inside it, else the absolute path)."""
    path = Path(os.path.expanduser(path_text))
    absolute = Path(os.path.normpath(path if path.is_absolute() else base / path))
    try:
        rel = absolute.relative_to(base).as_posix()
    except ValueError:
        rel = str(absolute)
    return str(absolute), rel


def parse_seconds(text, what: str, where: str) -> Optional[float]:
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {what} {text!r} is not a number of seconds") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise DataError(f"{where}: {what} {text!r} is not a number of seconds")
    return value


def check_segment(start: Optional[float], end: Optional[float], where: str):
    if start is None and end is None:
        return None, None
    start = 0.0 if start is None else start
    if start < 0:
        raise DataError(f"{where}: start {start} is negative")
    if end is not None and end <= start:
        raise DataError(f"{where}: end {end} is not after start {start}")
    return start, end


def segment_suffix(start: float, end: Optional[float]) -> str:
    last = "end" if end is None else f"{int(round(end * 1000)):08d}"
    return f"{int(round(start * 1000)):08d}_{last}"


def build(utterances: List[Tuple[Utterance, str]], base: Path) -> ScanResult:
    """Refuse one (dataset, speaker, utterance) given twice (naming both entries), give every entry a
    unique key (data.assign_keys: names that join into one key are told apart) and sort by key."""
    found: Dict[Tuple[str, str, str], Tuple[Utterance, str]] = {}
    for utt, where in utterances:
        triple = (utt.dataset, utt.speaker, utt.utterance)
        if triple in found:
            raise DataError(f"{found[triple][1]} and {where} both give dataset '{utt.dataset}', speaker "
                            f"'{utt.speaker}', utterance '{utt.utterance}' (key '{utt.key}'); "
                            "give them distinct utterance ids")
        found[triple] = (utt, where)
    chosen = [utt for utt, _ in found.values()]
    renames = assign_keys(chosen)
    return ScanResult(str(base), sorted(chosen, key=lambda u: u.key), renames=renames)


def make_utterance(dataset: str, speaker: str, utterance: str, path_text: str, base: Path,
                   start: Optional[float], end: Optional[float]) -> Utterance:
    path, rel = resolve(path_text, base)
    return Utterance(key=f"{dataset}_{speaker}_{utterance}", dataset=dataset, speaker=speaker,
                     utterance=utterance, path=path, rel_path=rel, start=start, end=end)


# --- manifest ------------------------------------------------------------------------------
def manifest_format(path: Path) -> str:
    kind = MANIFEST_SUFFIXES.get(Path(path).suffix.lower())
    if kind is None:
        raise DataError(f"manifest {path}: unknown format '{Path(path).suffix}' (use .csv, .tsv, .jsonl or .json)")
    return kind


def manifest_rows(path: Path) -> Iterable[Tuple[str, dict]]:
    """(where, row with canonical column names) for every entry; where = 'file:line'."""
    kind = manifest_format(path)
    try:
        handle = open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise DataError(f"manifest {path}: cannot read it ({exc.strerror or exc})") from None
    with handle:
        try:
            if kind in ("csv", "tsv"):
                reader = csv.DictReader(handle, delimiter="," if kind == "csv" else "\t")
                columns = [ALIASES.get(c.strip().lower(), c.strip().lower()) for c in reader.fieldnames or []]
                for needed in ("path", "speaker"):
                    if needed not in columns:
                        raise DataError(f"manifest {path}: no '{needed}' column (its columns: "
                                        f"{', '.join(reader.fieldnames or []) or 'none'})")
                for row in reader:
                    if None in row:
                        raise DataError(f"manifest {path}:{reader.line_num}: more fields than columns")
                    yield f"{path}:{reader.line_num}", dict(zip(columns, (row[c] for c in reader.fieldnames)))
            elif kind == "json":  # one array of objects
                try:
                    rows = json.load(handle)
                except ValueError as exc:
                    raise DataError(f"manifest {path}: not valid JSON ({exc})") from None
                if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                    raise DataError(f"manifest {path}: expected a JSON array of objects")
                for number, row in enumerate(rows, 1):
                    yield f"{path}: entry {number}", {ALIASES.get(k.lower(), k.lower()): v for k, v in row.items()}
            else:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as exc:
                        raise DataError(f"manifest {path}:{number}: not valid JSON ({exc})") from None
                    if not isinstance(row, dict):
                        raise DataError(f"manifest {path}:{number}: expected a JSON object per line")
                    yield f"{path}:{number}", {ALIASES.get(k.lower(), k.lower()): v for k, v in row.items()}
        except UnicodeDecodeError as exc:
            raise DataError(f"manifest {path}: not UTF-8 text ({exc.reason})") from None
        except csv.Error as exc:
            raise DataError(f"manifest {path}: {exc}") from None


def read_manifest(manifest, data_root=None, dataset: Optional[str] = None) -> ScanResult:
    path = Path(manifest).absolute()
    base = Path(data_root).absolute() if data_root is not None else path.parent
    entries = []
    for where, row in manifest_rows(path):

        def text(name):
            value = row.get(name)
            return "" if value is None else str(value).strip()

        audio, speaker = text("path"), text("speaker")
        if not audio:
            raise DataError(f"{where}: empty path")
        if not speaker:
            raise DataError(f"{where}: empty speaker")
        name = text("dataset") or (dataset or "")
        if not name:
            raise DataError(f"{where}: no dataset (add a 'dataset' column or give a dataset name)")
        start, end = check_segment(parse_seconds(row.get("start"), "start", where),
                                   parse_seconds(row.get("end"), "end", where), where)
        utterance = text("utterance")
        if not utterance:
            utterance = os.path.splitext(os.path.basename(audio))[0]
            if start is not None:
                utterance += "_" + segment_suffix(start, end)
        entries.append((make_utterance(name, speaker, utterance, audio, base, start, end), where))
    if not entries:
        raise DataError(f"manifest {path} lists no audio")
    return build(entries, base)


# --- Kaldi data dir ------------------------------------------------------------------------
def kaldi_table(path: Path, fields: int) -> Iterable[Tuple[int, List[str]]]:
    """(line number, fields) of a Kaldi table; the last field takes the rest of the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from None
    seen: Dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(None, fields - 1)
        if len(parts) != fields:
            raise DataError(f"{path}:{number}: expected {fields} fields, got {line.strip()!r}")
        if parts[0] in seen:
            raise DataError(f"{path}:{number}: '{parts[0]}' already given on line {seen[parts[0]]}")
        seen[parts[0]] = number
        yield number, parts


def read_kaldi_dir(kaldi_dir, data_root=None, dataset: Optional[str] = None) -> ScanResult:
    directory = Path(kaldi_dir).absolute()
    base = Path(data_root).absolute() if data_root is not None else Path.cwd()
    dataset = dataset or directory.name
    wav_scp = directory / "wav.scp"
    recordings: Dict[str, Tuple[str, str]] = {}   # id -> (path text, where)
    pipes = []
    for number, (rec, target) in kaldi_table(wav_scp, 2):
        where = f"{wav_scp}:{number}"
        if target.rstrip().endswith("|"):
            pipes.append(where)
        recordings[rec] = (target.strip(), where)
    if pipes:
        raise DataError(f"{pipes[0]}: pipe commands ('... |') in wav.scp are not supported ({len(pipes)} of "
                        f"{len(recordings)} entries); write that audio to files (e.g. with sox or ffmpeg) and "
                        "list the files instead")
    speakers = {utt: (spk, f"{directory / 'utt2spk'}:{n}") for n, (utt, spk) in kaldi_table(directory / "utt2spk", 2)}
    segments_file = directory / "segments"
    entries = []
    missing_speaker = []
    if segments_file.is_file():
        for number, (utt, rec, start_text, end_text) in kaldi_table(segments_file, 4):
            where = f"{segments_file}:{number}"
            if rec not in recordings:
                raise DataError(f"{where}: recording '{rec}' is not in {wav_scp}")
            start = parse_seconds(start_text, "start", where)
            end = parse_seconds(end_text, "end", where)
            if start is None or end is None:
                raise DataError(f"{where}: expected '<utterance> <recording> <start> <end>'")
            start, end = check_segment(start, None if end == -1 else end, where)
            entries.append((utt, recordings[rec][0], start, end, where))
    else:
        entries = [(rec, target, None, None, where) for rec, (target, where) in recordings.items()]
    utterances = []
    for utt, target, start, end, where in entries:
        if utt not in speakers:
            missing_speaker.append(f"{where} ('{utt}')")
            continue
        check_path_text(target, where)
        utterances.append((make_utterance(dataset, speakers.pop(utt)[0], utt, target, base, start, end), where))
    if missing_speaker:
        raise DataError(f"{len(missing_speaker)} utterance(s) have no speaker in {directory / 'utt2spk'}, "
                        f"e.g. {missing_speaker[0]}")
    if speakers:
        utt, (_, where) = next(iter(speakers.items()))
        listed = "segments" if segments_file.is_file() else "wav.scp"
        raise DataError(f"{len(speakers)} utterance(s) in utt2spk have no audio in {listed}, e.g. "
                        f"'{utt}' ({where})")
    if not utterances:
        raise DataError(f"Kaldi data dir {directory} lists no audio")
    return build(utterances, base)


def check_path_text(target: str, where: str) -> None:
    lowered = target.lower()
    if not lowered.endswith(AUDIO_EXTENSIONS) and ":" in target and target.rsplit(":", 1)[1].isdigit():
        raise DataError(f"{where}: '{target}' is a Kaldi ark offset, not an audio file; not supported")


# --- RTTM ----------------------------------------------------------------------------------
def rttm_to_manifest(rttm, audio_dir, output, dataset: str, min_duration_s: float = 0.0,
                     speaker_per_recording: bool = False) -> int:
    """Write a CSV manifest with one segment per RTTM speaker turn; returns the number of rows.

    ``audio_dir/<recording id>.<wav|flac|ogg|mp3>`` is each RTTM file id's audio. Speaker labels
    are global unless ``speaker_per_recording`` (diarization output: 'spk0' differs per file)."""
    rttm, audio_dir = Path(rttm), Path(audio_dir)
    audio: Dict[str, Path] = {}
    rows = []
    try:
        lines = rttm.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{rttm}: cannot read it ({exc})") from None
    for number, line in enumerate(lines, 1):
        parts = line.split()
        if not parts or parts[0] != "SPEAKER":
            continue
        where = f"{rttm}:{number}"
        if len(parts) < 8:
            raise DataError(f"{where}: a SPEAKER line needs at least 8 fields")
        rec, speaker = parts[1], parts[7]
        start = parse_seconds(parts[3], "start", where)
        duration = parse_seconds(parts[4], "duration", where)
        if start is None or duration is None or duration <= 0:
            raise DataError(f"{where}: bad turn times {parts[3]!r} {parts[4]!r}")
        if duration < min_duration_s:
            continue
        if rec not in audio:
            candidates = [audio_dir / f"{rec}{ext}" for ext in AUDIO_EXTENSIONS]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise DataError(f"{where}: no audio for recording '{rec}' in {audio_dir} "
                                f"({', '.join(AUDIO_EXTENSIONS)})")
            audio[rec] = found[0].absolute()
        end = start + duration
        rows.append({"path": str(audio[rec]), "dataset": dataset,
                     "speaker": f"{rec}-{speaker}" if speaker_per_recording else speaker,
                     "utterance": f"{rec}_{segment_suffix(start, end)}",
                     "start": f"{start:.3f}", "end": f"{end:.3f}"})
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "dataset", "speaker", "utterance", "start", "end"])
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def main(argv=None) -> int:
    import argparse
    import sys
    p = argparse.ArgumentParser(prog=prog("speakerlab.manifest"),
                                description="Write a segment manifest (CSV) from an RTTM file.")
    p.add_argument("--rttm", required=True)
    p.add_argument("--audio_dir", required=True, help="holds <recording id>.<wav|flac|ogg|mp3>")
    p.add_argument("--dataset", required=True, help="dataset name for the keys")
    p.add_argument("--output", required=True, help="manifest CSV to write")
    p.add_argument("--min_duration", type=float, default=0.0, help="skip turns shorter than this (s)")
    p.add_argument("--speaker_per_recording", action="store_true",
                   help="speaker labels are local to each recording (diarization output)")
    args = p.parse_args(argv)
    try:
        count = rttm_to_manifest(args.rttm, args.audio_dir, args.output, args.dataset, args.min_duration,
                                 args.speaker_per_recording)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {count} segments to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
