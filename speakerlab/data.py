"""The utterance list: scanning a data tree, reading headers, sharding by duration.

Layout: ``data_root/<dataset>/<speaker>/[<sub>/...]<utterance>.<ext>``. Deeper directories (VoxCeleb's
``speaker/video/00001.wav``, LibriSpeech's ``speaker/chapter/utt.flac``) belong to the speaker; their
names join the utterance id. Keys: ``<dataset>_<speaker>_<utterance>`` and ``<dataset>_<speaker>``,
made unique by ``assign_keys`` when joined names collide (``a_b/c`` and ``a/b_c``).
"""
import bisect
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


class DataError(ValueError):
    """A problem with the input as a whole (missing root, empty tree, key clash)."""


@dataclass(slots=True)  # millions of these: no per-object __dict__
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
    # set when read from a scan file: its record (count and keys_sha1 of the whole scan, scan_id, the
    # shard bounds); ``utterances`` may then be one rank's shard only
    meta: Dict[str, object] = field(default_factory=dict, compare=False, repr=False)


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


def assign_keys(utterances: List[Utterance], raw_ids=None) -> List[Dict[str, object]]:
    """Give every utterance its key (and speaker key) so that two different (dataset, speaker) pairs
    never share a speaker key and two different (dataset, speaker, utterance) triples never share an
    utterance key. ``raw_ids`` names each utterance as given when its id joins several names (a tree's
    ``sub/dir/stem``), so ``v/1.wav`` and ``v_1.wav`` count as different utterances: a list (one per
    utterance) or a function of the utterance. Every triple must be given once. Returns the renames
    (keys that differ from ``<dataset>_<speaker>[_<utterance>]``).

    Lean for millions of utterances: keys are set in place (an unchanged key keeps its string), and
    clashes are found as neighbours in key order, so only the clashing utterances are looked at again;
    no per-utterance dict is built. Same keys as ``_unique_keys`` over all the triples would give."""
    if raw_ids is None:
        def raw_of(i, utt):
            return utt.utterance
    elif callable(raw_ids):
        def raw_of(i, utt):
            return raw_ids(utt)
    else:
        def raw_of(i, utt):
            return raw_ids[i]
    speakers = _unique_keys({(u.dataset, u.speaker): f"{u.dataset}_{u.speaker}" for u in utterances})
    for utt in utterances:
        speaker_key = speakers[(utt.dataset, utt.speaker)]
        utt.spk_key = speaker_key if speaker_key != f"{utt.dataset}_{utt.speaker}" else ""
        plain = f"{speaker_key}_{utt.utterance}"
        if utt.key != plain:
            utt.key = plain
    position = {id(u): i for i, u in enumerate(utterances)} if not callable(raw_ids) and raw_ids is not None else None
    ranked = sorted(utterances, key=lambda u: u.key)
    shared: Dict[tuple, Utterance] = {}  # triple -> utterance, for keys held by more than one triple
    for first in range(len(ranked) - 1):
        if ranked[first].key == ranked[first + 1].key:
            for utt in (ranked[first], ranked[first + 1]):
                index = position[id(utt)] if position is not None else -1
                shared[(utt.dataset, utt.speaker, raw_of(index, utt))] = utt
    if shared:
        sorted_keys = [u.key for u in ranked]

        def held_alone(key: str) -> bool:  # a key some utterance keeps untagged
            at = bisect.bisect_left(sorted_keys, key)
            return at < len(sorted_keys) and sorted_keys[at] == key and \
                (at + 1 == len(sorted_keys) or sorted_keys[at + 1] != key) and (at == 0 or sorted_keys[at - 1] != key)
        for length in TAG_LENGTHS:
            tagged = {triple: f"{utt.key}-{name_tag(triple, length)}" for triple, utt in shared.items()}
            values = set(tagged.values())
            if len(values) == len(tagged) and not any(held_alone(v) for v in values):
                break
        else:
            raise DataError(f"cannot make unique keys for {len(shared)} entries sharing keys, "
                            f"e.g. '{next(iter(shared.values())).key}'")
        for triple, utt in shared.items():
            utt.key = tagged[triple]
    renames: List[Dict[str, object]] = []
    for (dataset, speaker), key in sorted(speakers.items()):
        if key != f"{dataset}_{speaker}":
            renames.append({"level": "speaker", "old": f"{dataset}_{speaker}", "new": key, "dataset": dataset,
                            "speaker": speaker, "utterance": None, "path": None})
    for utt in utterances:
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


def _walk(root: Path, errors: List[Dict[str, str]]) -> Iterable[Tuple[Tuple[str, ...], str]]:
    """Yield (relative parts, path) of every non-directory entry: depth first, in name order, a
    directory's files before its subdirectories. Paths are plain strings (a Path per file costs
    a third of the walk's time at a million files).

    Symlinked directories are followed once: the real tree is walked first, then the symlinked
    directories whose target was not walked already, so a loop or a second link to a directory ends
    the descent. A directory that cannot be listed is recorded in ``errors``, never skipped silently.
    """
    seen = set()
    stack = [(str(root), ())]
    linked: List[Tuple[str, Tuple[str, ...]]] = []
    while stack or linked:
        directory, parts = stack.pop() if stack else linked.pop(0)
        try:
            info = os.stat(directory)
            ident = (info.st_dev, info.st_ino)
            if ident in seen:
                continue  # a symlink loop or a second link to a directory already walked
            seen.add(ident)
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            errors.append({"path": display_path(directory), "stage": "scan",
                           "reason": f"cannot list directory: {exc.strerror or exc}; files in it were not seen"})
            continue
        subdirs = []
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                (linked if entry.is_symlink() else subdirs).append((entry.path, parts + (entry.name,)))
            else:
                yield parts + (entry.name,), entry.path
        stack.extend(reversed(subdirs))  # popped in name order


def scan_tree(data_root) -> ScanResult:
    root = Path(data_root).absolute()
    if not root.is_dir():
        raise DataError(f"data_root {root} is not a directory")
    ignored: Dict[str, int] = {}
    examples: List[str] = []
    errors: List[Dict[str, str]] = []

    def ignore(reason: str, rel: str) -> None:
        ignored[reason] = ignored.get(reason, 0) + 1
        if len(examples) < 20:
            examples.append(f"{display_path(rel)}: {reason}")

    chosen: List[Utterance] = []
    # u1.wav beside u1.flac: one utterance twice. Such files share a directory, and the walk gives a
    # directory's files one after another, so only the current directory's stems are kept
    folder, stems = None, {}
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
        if parts[:-1] != folder:
            folder, stems = parts[:-1], {}
        stem = os.path.splitext(parts[-1])[0]
        if stem in stems:  # the first one walked keeps it
            taken = stems[stem]
            errors.append({"path": display_path(path), "stage": "scan",
                           "reason": f"two files map to one key: '{taken.key}' is taken by {taken.path}; "
                                     "rename one of them"})
            continue
        dataset, speaker = sys.intern(parts[0]), sys.intern(parts[1])  # shared by the files of a speaker
        utterance = "_".join(list(parts[2:-1]) + [stem])
        utt = Utterance(key=f"{dataset}_{speaker}_{utterance}", dataset=dataset, speaker=speaker,
                        utterance=utterance, path=path, rel_path=rel)
        stems[stem] = utt
        chosen.append(utt)
    renames = assign_keys(chosen, tree_raw_id)
    chosen.sort(key=lambda u: u.key)
    return ScanResult(str(root), chosen, ignored, examples, errors=errors, renames=renames)


def tree_raw_id(utt: Utterance) -> str:
    """An utterance's names below its speaker as given in the tree: ``sub/dir/stem``."""
    return os.path.splitext(utt.rel_path.split("/", 2)[2])[0]


def read_header(utt: Utterance) -> None:
    import soundfile as sf
    from speakerlab.audio import AudioError, check_regular_file, explain_open_error, header_problem
    try:
        check_regular_file(utt.path)
        # the three numbers straight from an open SoundFile: sf.info also formats names and an
        # "extra info" text per file (half the time of a header read)
        with sf.SoundFile(utt.path) as handle:
            utt.sample_rate, utt.channels, frames = int(handle.samplerate), int(handle.channels), int(handle.frames)
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


def _read_header_run(utterances: List[Utterance]) -> None:
    for utt in utterances:
        read_header(utt)


def read_headers(utterances: List[Utterance], threads: int = 16) -> int:
    """Fill sample_rate / num_samples / channels; I/O bound, so threads overlap the waits. Returns
    the number of headers read. A task is a run of 64 files: a future per file cost more than the
    header read itself on a warm cache (100k futures: 10 s of a 14 s scan, all holding the GIL)."""
    run = 64
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for first in range(0, len(utterances), 65536):  # a window at a time: bounded futures
            stop = min(len(utterances), first + 65536)
            list(pool.map(_read_header_run, [utterances[a:min(stop, a + run)] for a in range(first, stop, run)]))
    return len(utterances)


def shard_bounds(durations, world_size: int) -> List[int]:
    """Row bounds of each rank's shard: rank r takes rows ``bounds[r]:bounds[r+1]`` (rows in key order).

    Contiguous ranges balanced by duration: a row goes to the rank whose share of the total holds
    the middle of its duration (each file weighs at least 10 ms), so every rank's total is within
    one file of ``total / world``. Contiguous, so a rank reads only its part of the scan file, and
    the ranks' outputs, each in key order, concatenate into the key order of the whole corpus.
    Computed once, by the rank that writes the scan, and stored with it.
    """
    import numpy as np
    weights = np.maximum(np.asarray(durations, dtype=np.float64), 0.01)
    if world_size <= 1 or not len(weights):
        return [0] + [len(weights)] * max(1, world_size)
    ends = np.cumsum(weights)
    middles = ends - weights / 2
    owners = np.minimum((middles * world_size / ends[-1]).astype(np.int64), world_size - 1)
    owners = np.maximum.accumulate(owners)  # monotone even under rounding
    return [int(b) for b in np.searchsorted(owners, np.arange(world_size + 1), side="left")]


def shard_by_duration(utterances: List[Utterance], rank: int, world_size: int) -> List[Utterance]:
    """This rank's contiguous, duration-balanced share of ``utterances`` (in key order); see shard_bounds."""
    bounds = shard_bounds([u.duration for u in utterances], world_size)
    return list(utterances[bounds[rank]:bounds[rank + 1]])


def header_slice(count: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Rows whose headers rank ``rank`` reads when the ranks share the header reads: a 1/world slice."""
    return count * rank // world_size, count * (rank + 1) // world_size


def keys_digest(utterances) -> str:
    """sha1 over the keys in order: what a rank's results are tied to."""
    digest = hashlib.sha1()
    for utt in utterances:
        digest.update(utt.key.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def utterance_record(utt: Utterance) -> Dict[str, object]:
    return asdict(utt)
