"""The utterance list: scanning a data tree, reading headers, sharding by duration.

Layout: ``data_root/<dataset>/<speaker>/[<sub>/...]<utterance>.<ext>``. Deeper directories (VoxCeleb's
``speaker/video/00001.wav``, LibriSpeech's ``speaker/chapter/utt.flac``) belong to the speaker; their
names join the utterance id. Keys: ``<dataset>_<speaker>_<utterance>`` and ``<dataset>_<speaker>``,
made unique by ``assign_keys`` when joined names collide (``a_b/c`` and ``a/b_c``).
"""
import hashlib
import heapq
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


class DataError(ValueError):
    """A problem with the input as a whole (missing root, empty tree, key clash)."""


@dataclass
class Utterance:
    key: str
    dataset: str
    speaker: str
    utterance: str
    path: str                      # as the pipeline opens it
    rel_path: str = ""             # relative to data_root (for lookups by path)
    start: Optional[float] = None  # segment in seconds, None = whole file
    end: Optional[float] = None
    sample_rate: int = 0           # from the header, 0 when it could not be read
    num_samples: int = 0           # in the file's own rate (of the segment when start/end are set)
    channels: int = 0
    header_error: str = ""
    spk_key: str = ""              # set only when the plain speaker key names two speakers (assign_keys)

    @property
    def speaker_key(self) -> str:
        return self.spk_key or f"{self.dataset}_{self.speaker}"

    @property
    def duration(self) -> float:
        # an implausible header (e.g. 1 Hz) must not weigh on sharding: the file fails at decode
        return self.num_samples / self.sample_rate if self.sample_rate and not self.header_error else 0.0


@dataclass
class ScanResult:
    data_root: str
    utterances: List[Utterance]
    ignored: Dict[str, int] = field(default_factory=dict)  # reason -> count
    ignored_examples: List[str] = field(default_factory=list)
    source: Dict[str, object] = field(default_factory=dict)  # what was read (see manifest.describe_source)
    # what the scan could not look into or use: {"path", "stage": "scan", "reason"}; reported in
    # failures.json, since audio files may hide there (an unreadable directory, a non-UTF-8 name)
    errors: List[Dict[str, str]] = field(default_factory=list)
    # keys changed because two distinct names joined into one key: {level, old, new, dataset, speaker,
    # utterance, path} (see assign_keys); merge lists them in summary.json as key_renames
    renames: List[Dict[str, object]] = field(default_factory=list)


# --- keys ----------------------------------------------------------------------------------
# Keys join names with "_", so distinct names can meet: speakers a_b/c and a/b_c both give "a_b_c".
# Such keys get a tag: a hash of the names as given, so the result depends only on the set of names
# (never on the order they were read in) and every key nobody shares stays exactly as before.
TAG_LENGTHS = (8, 12, 16, 24, 40)


def name_tag(names, length: int) -> str:
    text = json.dumps(list(names), ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:length]


def _unique_keys(plain: Dict[tuple, str]) -> Dict[tuple, str]:
    """identity -> key: the plain key, or ``<plain>-<tag>`` for identities whose plain key is shared.
    Tags grow until every key is distinct (a longer tag is only needed if a name was made to match
    another's tagged key)."""
    owners: Dict[str, int] = {}
    for key in plain.values():
        owners[key] = owners.get(key, 0) + 1
    shared = [ident for ident, key in plain.items() if owners[key] > 1]
    if not shared:
        return dict(plain)
    for length in TAG_LENGTHS:
        keys = dict(plain)
        for ident in shared:
            keys[ident] = f"{plain[ident]}-{name_tag(ident, length)}"
        if len(set(keys.values())) == len(keys):
            return keys
    raise DataError(f"cannot make unique keys for {len(shared)} entries sharing keys, e.g. '{plain[shared[0]]}'")


def assign_keys(utterances: List[Utterance], raw_ids: Optional[List[str]] = None) -> List[Dict[str, object]]:
    """Give every utterance its key (and speaker key) so that two different (dataset, speaker) pairs
    never share a speaker key and two different (dataset, speaker, utterance) triples never share an
    utterance key. ``raw_ids`` names each utterance as given when its id joins several names (a tree's
    ``sub/dir/stem``), so ``v/1.wav`` and ``v_1.wav`` count as different utterances. Every triple
    must be given once. Returns the renames (keys that differ from ``<dataset>_<speaker>[_<utterance>]``)."""
    raw_ids = raw_ids or [u.utterance for u in utterances]
    speakers = _unique_keys({(u.dataset, u.speaker): f"{u.dataset}_{u.speaker}" for u in utterances})
    triples = [(u.dataset, u.speaker, raw) for u, raw in zip(utterances, raw_ids)]
    keys = _unique_keys({t: f"{speakers[t[:2]]}_{u.utterance}" for u, t in zip(utterances, triples)})
    renames: List[Dict[str, object]] = []
    for (dataset, speaker), key in sorted(speakers.items()):
        if key != f"{dataset}_{speaker}":
            renames.append({"level": "speaker", "old": f"{dataset}_{speaker}", "new": key, "dataset": dataset,
                            "speaker": speaker, "utterance": None, "path": None})
    for utt, triple in zip(utterances, triples):
        utt.spk_key = speakers[triple[:2]] if speakers[triple[:2]] != f"{utt.dataset}_{utt.speaker}" else ""
        utt.key = keys[triple]
        old = f"{utt.dataset}_{utt.speaker}_{utt.utterance}"
        if utt.key != old:
            renames.append({"level": "utterance", "old": old, "new": utt.key, "dataset": utt.dataset,
                            "speaker": utt.speaker, "utterance": utt.utterance, "path": utt.path})
    renames.sort(key=lambda r: (r["level"] != "speaker", r["old"], r["new"]))
    return renames


def describe_renames(renames: List[Dict[str, object]]) -> str:
    """One line for the log: how many keys were renamed and an example."""
    speakers = [r for r in renames if r["level"] == "speaker"]
    utterances = [r for r in renames if r["level"] == "utterance"]
    first = speakers[0] if speakers else utterances[0]
    example = (f"speaker '{first['speaker']}' of dataset '{first['dataset']}'" if first["level"] == "speaker"
               else display_path(first["path"]))
    return (f"{len(speakers)} speaker key(s) and {len(utterances)} utterance key(s) renamed because different "
            f"names join into one key (e.g. {example}: '{first['old']}' -> '{first['new']}'); "
            "summary.json lists them all under key_renames")


def display_path(path) -> str:
    """A path as text that always encodes (undecodable bytes shown as \\xNN)."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def _walk(root: Path, errors: List[Dict[str, str]]) -> Iterable[Tuple[Tuple[str, ...], Path]]:
    """Yield (relative parts, path) of every non-directory entry: depth first, in name order, a
    directory's files before its subdirectories.

    Symlinked directories are followed once: the real tree is walked first, then the symlinked
    directories whose target was not walked already, so a loop or a second link to a directory ends
    the descent. A directory that cannot be listed is recorded in ``errors``, never skipped silently.
    """
    seen = set()
    stack = [(root, ())]
    linked: List[Tuple[Path, Tuple[str, ...]]] = []
    while stack or linked:
        directory, parts = stack.pop() if stack else linked.pop(0)
        try:
            info = directory.stat()
            ident = (info.st_dev, info.st_ino)
            if ident in seen:
                continue  # a symlink loop or a second link to a directory already walked
            seen.add(ident)
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            errors.append({"path": display_path(directory), "stage": "scan",
                           "reason": f"cannot list directory: {exc.strerror or exc}; files in it were not seen"})
            continue
        subdirs = []
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                (linked if entry.is_symlink() else subdirs).append((path, parts + (entry.name,)))
            else:
                yield parts + (entry.name,), path
        stack.extend(reversed(subdirs))  # popped in name order


def scan_tree(data_root) -> ScanResult:
    root = Path(data_root).absolute()
    if not root.is_dir():
        raise DataError(f"data_root {root} is not a directory")
    found: Dict[str, Utterance] = {}
    ignored: Dict[str, int] = {}
    examples: List[str] = []
    errors: List[Dict[str, str]] = []

    def ignore(reason: str, rel: str) -> None:
        ignored[reason] = ignored.get(reason, 0) + 1
        if len(examples) < 20:
            examples.append(f"{display_path(rel)}: {reason}")

    raw_ids: Dict[str, str] = {}
    for parts, path in _walk(root, errors):
        rel = "/".join(parts)
        if not parts[-1].lower().endswith(AUDIO_EXTENSIONS):
            ignore("not an audio extension", rel)
            continue
        if len(parts) < 3:
            ignore("not under <dataset>/<speaker>/", rel)
            continue
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes: no key or JSON record can hold the name
            errors.append({"path": display_path(path), "stage": "scan",
                           "reason": "the path is not valid UTF-8; rename the file to use it"})
            continue
        dataset, speaker = parts[0], parts[1]
        names = list(parts[2:-1]) + [os.path.splitext(parts[-1])[0]]
        raw = "\0".join([dataset, speaker] + names)  # "/" and NUL never occur in a name
        if raw in found:  # u1.wav beside u1.flac: one utterance twice; the first one walked keeps it
            errors.append({"path": display_path(path), "stage": "scan",
                           "reason": f"two files map to one key: '{found[raw].key}' is taken by {found[raw].path}; "
                                     "rename one of them"})
            continue
        utterance = "_".join(names)
        found[raw] = Utterance(key=f"{dataset}_{speaker}_{utterance}", dataset=dataset, speaker=speaker,
                               utterance=utterance, path=str(path), rel_path=rel)
        raw_ids[raw] = "/".join(names)
    chosen = list(found.values())
    renames = assign_keys(chosen, [raw_ids[r] for r in found])
    utterances = sorted(chosen, key=lambda u: u.key)
    return ScanResult(str(root), utterances, ignored, examples, errors=errors, renames=renames)


def read_header(utt: Utterance) -> None:
    import soundfile as sf
    from speakerlab.audio import AudioError, check_regular_file, explain_open_error, header_problem
    try:
        check_regular_file(utt.path)
        info = sf.info(utt.path)
        utt.sample_rate, utt.channels = int(info.samplerate), int(info.channels)
        frames = int(info.frames)
        if utt.start is not None:
            first = int(round(utt.start * utt.sample_rate))
            last = frames if utt.end is None else min(frames, int(round(utt.end * utt.sample_rate)))
            frames = max(0, last - first)
        utt.num_samples = frames
        utt.header_error = header_problem(utt.sample_rate, frames)  # the file fails at decode, for this reason
    except AudioError as exc:
        utt.header_error = exc.reason
    except Exception as exc:  # soundfile raises RuntimeError/LibsndfileError/OSError; all mean "unreadable"
        utt.header_error = explain_open_error(utt.path, exc)


def read_headers(utterances: List[Utterance], threads: int = 16) -> None:
    """Fill sample_rate / num_samples / channels; I/O bound, so threads overlap the waits."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(read_header, utterances, chunksize=256))


def shard_by_duration(utterances: List[Utterance], rank: int, world_size: int) -> List[Utterance]:
    """Longest-first greedy assignment to the least-loaded rank: every utterance exactly once,
    total durations balanced, the same answer on every rank. Returned in input order."""
    if world_size == 1:
        return list(utterances)
    order = sorted(range(len(utterances)),
                   key=lambda i: (-max(utterances[i].duration, 0.01), utterances[i].key))
    loads = [(0.0, r) for r in range(world_size)]
    mine = []
    for index in order:
        load, owner = heapq.heappop(loads)
        if owner == rank:
            mine.append(index)
        heapq.heappush(loads, (load + max(utterances[index].duration, 0.01), owner))
    return [utterances[i] for i in sorted(mine)]


_FIELDS = [f for f in Utterance.__dataclass_fields__]


def save_scan(scan: ScanResult, path: Path) -> None:
    """Columnar JSON (compact for millions of rows), written atomically."""
    rows = [[getattr(u, f) for f in _FIELDS] for u in scan.utterances]
    payload = {"data_root": scan.data_root, "fields": _FIELDS, "rows": rows,
               "ignored": scan.ignored, "ignored_examples": scan.ignored_examples,
               "source": scan.source or {"type": "tree", "path": scan.data_root}, "errors": scan.errors,
               "renames": scan.renames}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, ensure_ascii=False, separators=(",", ":"))
    os.replace(tmp, path)


def load_scan(path: Path) -> ScanResult:
    with open(path, encoding="utf-8") as handle:
        payload = json.load(handle)
    fields = payload["fields"]
    utterances = [Utterance(**dict(zip(fields, row))) for row in payload["rows"]]
    return ScanResult(payload["data_root"], utterances, payload.get("ignored", {}),
                      payload.get("ignored_examples", []),
                      payload.get("source") or {"type": "tree", "path": payload["data_root"]},
                      payload.get("errors", []), payload.get("renames", []))


def utterance_record(utt: Utterance) -> Dict[str, object]:
    return asdict(utt)
