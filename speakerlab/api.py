"""Python API for notebooks: embed audio with a model, and explore a final output directory.

    import speakerlab
    model = speakerlab.load_model()                  # the embedded CAM++ zh/en model (or checkpoint + config)
    e = model.embed("a.wav")                         # (192,) float32: the pipeline's numbers for that file
    E = model.embed(["a.wav", "b.flac", (wave, 8000)])   # (3, 192), batched like the pipeline
    model.compare("a.wav", "b.wav")                  # cosine similarity

    emb = speakerlab.load_embeddings("exp/embeddings")   # a merge_embeddings.py output dir
    emb.similar("ds_spk1_utt3", k=5, same_speaker=False)
    keys, matrix = emb.matrix()

Files go through ``speakerlab.audio.load_audio`` and ``speakerlab.embedder.Embedder`` exactly as in the
pipeline, with the same default precision, so ``model.embed(path)`` reproduces the pipeline's embedding.
"""
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from speakerlab.audio import AudioError, finish_wave, load_audio

from speakerlab.vectors import Match, cosine, query_vector, top as _top  # noqa: F401 (Match and cosine are API names)


def _is_pair(item) -> bool:
    """``(wave, sample_rate)``."""
    return (isinstance(item, tuple) and len(item) == 2 and not isinstance(item[0], (str, os.PathLike))
            and isinstance(item[1], (int, float, np.integer, np.floating)))


def _normalize_rows(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float32)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=-1, keepdims=True), 1e-12)


# --- models --------------------------------------------------------------------------------
def _array_to_wave(data, rate: int, target_rate: int, channels: str, label: str) -> np.ndarray:
    """An in-memory signal -> float32 mono at ``target_rate``, checked like ``audio.load_audio``.

    1-D arrays are mono; 2-D arrays are (samples, channels) as soundfile returns them, or
    (channels, samples) as torchaudio does when the first dimension is the small one (<= 8).
    Integer PCM is scaled to [-1, 1) as soundfile does.
    """
    if hasattr(data, "detach"):  # a torch tensor
        data = data.detach().cpu().numpy()
    data = np.asarray(data)
    if data.ndim == 2 and data.shape[0] <= 8 < data.shape[1]:
        data = data.T
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2:
        raise AudioError(label, "validate", f"expected a 1-D or 2-D array, got shape {data.shape}")
    if data.dtype.kind == "i":
        data = data.astype(np.float32) / float(2 ** (8 * data.dtype.itemsize - 1))
    elif data.dtype.kind == "u":
        half = float(2 ** (8 * data.dtype.itemsize - 1))
        data = (data.astype(np.float32) - half) / half
    elif data.dtype.kind == "f":
        data = data.astype(np.float32, copy=False)
    else:
        raise AudioError(label, "validate", f"unsupported array dtype {data.dtype}")
    if data.shape[0] == 0:
        raise AudioError(label, "validate", "no audio samples (empty array)")
    if not np.isfinite(data).all():
        raise AudioError(label, "validate", "contains NaN or Inf samples")
    wave = data.mean(axis=1) if channels == "mean" else data[:, 0]
    return finish_wave(wave, int(rate), target_rate, label)


class SpeakerModel:
    """A loaded model plus its fbank front end; ``embed`` and ``compare`` take files or arrays."""

    def __init__(self, model, config, device, dtype: str = "auto", channels: str = "first",
                 max_chunk_s: float = 300.0, name: str = "", checkpoint: str = "", fuse: bool = True,
                 backend: str = "auto"):
        from speakerlab.embedder import Embedder, check_engine_args
        check_engine_args(dtype, backend)
        if channels not in ("first", "mean"):
            raise ValueError(f"channels must be 'first' or 'mean', not {channels!r}")
        self.config = config
        self.device = device
        self.channels = channels
        self.name = name
        self.checkpoint = checkpoint
        # dtype / backend "auto": the pipeline's policy (speakerlab/calibration.py), one thread plan
        self.embedder = Embedder(model, config, device, dtype=dtype, max_chunk_s=max_chunk_s, fuse=fuse,
                                 backend=backend)
        self.dtype = self.embedder.dtype
        self.backend = self.embedder.backend
        self.engine = self.embedder.choice  # what auto chose and why

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def model(self):
        return self.embedder.model

    def __repr__(self) -> str:
        return (f"SpeakerModel({self.name or self.config.obj}, device={self.device}, dtype={self.dtype}, "
                f"sample_rate={self.sample_rate})")

    # one input -> (label, wave at the model's rate)
    def _load(self, item, sample_rate: Optional[int]) -> Tuple[str, np.ndarray]:
        if isinstance(item, (str, os.PathLike)):
            return str(item), load_audio(str(item), self.sample_rate, self.channels)
        if _is_pair(item):
            item, sample_rate = item
        if sample_rate is None:
            raise ValueError("embedding an array needs its sample rate: embed(wave, sample_rate=16000) "
                             "or embed([(wave, 16000), ...])")
        return "<array>", _array_to_wave(item, sample_rate, self.sample_rate, self.channels, "<array>")

    def embed(self, audio, sample_rate: Optional[int] = None, batch_size: int = 128,
              batch_frames: Optional[int] = None, on_error: str = "raise",
              normalize: bool = False) -> np.ndarray:
        """Embed a file, an array (with ``sample_rate``), or a list of them.

        One input gives a (D,) float32 vector, a list gives (N, D), batched by length under a frame
        budget as the pipeline does. A file or array that cannot be embedded raises ``AudioError``
        naming it; with ``on_error="nan"`` its row is NaN instead. ``normalize`` L2-normalises.
        """
        if on_error not in ("raise", "nan"):
            raise ValueError("on_error must be 'raise' or 'nan'")
        single = isinstance(audio, (str, os.PathLike)) or hasattr(audio, "shape") or _is_pair(audio)
        items = [audio] if single else list(audio)
        if isinstance(sample_rate, (list, tuple)):
            if len(sample_rate) != len(items):
                raise ValueError("sample_rate list must have one rate per input")
            rates = list(sample_rate)
        else:
            rates = [sample_rate] * len(items)
        matrix = self._embed_many(items, rates, batch_size, batch_frames, on_error)
        if normalize:
            matrix = _normalize_rows(matrix)
        return matrix[0] if single else matrix

    def _embed_many(self, items, rates, batch_size, batch_frames, on_error) -> np.ndarray:
        from speakerlab.batching import pad_waves, plan_batches
        dim = None
        rows: List[Optional[np.ndarray]] = [None] * len(items)
        batch_frames = self.embedder.batch_frames(batch_frames)
        block = max(1, batch_size) * 8  # decode a bounded number of inputs at a time
        for first in range(0, len(items), block):
            labels, waves, positions = [], [], []
            for position in range(first, min(first + block, len(items))):
                try:
                    label, wave = self._load(items[position], rates[position])
                except AudioError:
                    if on_error == "raise":
                        raise
                    continue
                labels.append(label)
                waves.append(wave)
                positions.append(position)
            for batch in plan_batches([len(w) for w in waves], batch_frames, batch_size, grid=self.embedder.grid,
                                      grid_steps=self.embedder.grid_steps):
                padded, lengths = pad_waves([waves[i] for i in batch])
                for i, result in zip(batch, self.embedder.embed(padded, lengths)):
                    if result.error:
                        if on_error == "raise":
                            raise AudioError(labels[i], *result.error)
                        continue
                    rows[positions[i]] = result.embedding
                    dim = len(result.embedding)
        if dim is None:
            dim = int(self.config.embedding_size or 0)
        out = np.full((len(items), dim), np.nan, dtype=np.float32)
        for position, row in enumerate(rows):
            if row is not None:
                out[position] = row
        return out

    def compare(self, a, b, sample_rate: Optional[int] = None) -> float:
        """Cosine similarity of two files or arrays (arrays at ``sample_rate``)."""
        first, second = self.embed([a, b], sample_rate=sample_rate)
        return cosine(first, second)


def _pick_device(device) -> "torch.device":
    import torch
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(model_path=None, config_file=None, device=None, dtype: str = "auto",
               channels: str = "first", max_chunk_s: float = 300.0, fuse: bool = True,
               backend: str = "auto") -> SpeakerModel:
    """Load a model for ``embed``/``compare``.

    No arguments: the embedded default CAM++ zh/en model (fetched once, see ``speakerlab.zoo``).
    ``model_path`` needs ``config_file`` (e.g. ``conf/eres2netv2.yaml``). ``device``: None picks CUDA
    when present, else CPU. ``dtype``: auto (the pipeline's choice), fp32, bf16 or fp16. ``fuse``:
    conv + BatchNorm + activation as one op (``speakerlab.models.fusion``), as the pipeline does.
    ``backend``: auto, torch or openvino (CPU; ``pip install .[openvino]``). On CPU, auto dtype and
    backend are the fastest measured on this machine (``speakerlab.calibration``, cached); ``.engine``
    says what was chosen and why.
    """
    from speakerlab import zoo
    from speakerlab.config import load_config
    from speakerlab.models import load_model as build_and_load
    model_path, config_file, name = zoo.resolve_model(model_path, config_file)
    config = load_config(config_file)
    model = build_and_load(config, model_path)
    return SpeakerModel(model, config, _pick_device(device), dtype=dtype, channels=channels,
                        max_chunk_s=max_chunk_s, name=name, checkpoint=str(model_path), fuse=fuse,
                        backend=backend)


# --- final output directories --------------------------------------------------------------
class EmbeddingSet:
    """Utterance and speaker embeddings of a final output dir (or a subset of one).

    ``utterances`` / ``speakers``: dicts key -> record (the pickles' fields plus ``speaker_key``,
    ``duration`` ..., and ``embedding``); ``keys`` / ``speaker_keys``: sorted keys, the row order of
    ``matrix()``.
    """

    def __init__(self, keys: Sequence[str], matrix: np.ndarray, records: Sequence[dict],
                 speaker_keys: Sequence[str], speaker_matrix: np.ndarray, speaker_records: Sequence[dict],
                 summary: Optional[dict] = None, directory: Optional[Path] = None):
        self.keys = list(keys)
        self.speaker_keys = list(speaker_keys)
        self._matrix = np.asarray(matrix, dtype=np.float32)
        self._speaker_matrix = np.asarray(speaker_matrix, dtype=np.float32)
        self._records = list(records)
        self._speaker_records = list(speaker_records)
        self.summary = summary or {}
        self.directory = directory
        self._index = {k: i for i, k in enumerate(self.keys)}
        self._speaker_index = {k: i for i, k in enumerate(self.speaker_keys)}
        self._normed = None
        self._speaker_normed = None
        self._labels = None
        self._paths = None
        self._model = None
        self._utterances = None
        self._speakers = None

    # --- views ---
    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key) -> bool:
        return key in self._index

    def __getitem__(self, key: str) -> dict:
        return self.utterances[key]

    def __repr__(self) -> str:
        where = f" from {self.directory}" if self.directory else ""
        return (f"EmbeddingSet({len(self.keys)} utterances, {len(self.speaker_keys)} speakers, "
                f"{len(self.datasets)} datasets, dim {self.dim}{where})")

    @property
    def dim(self) -> int:
        return int(self._matrix.shape[1]) if self._matrix.ndim == 2 else 0

    @property
    def utterances(self) -> Dict[str, dict]:
        if self._utterances is None:
            self._utterances = {k: dict(r, embedding=self._matrix[i])
                                for i, (k, r) in enumerate(zip(self.keys, self._records))}
        return self._utterances

    @property
    def speakers(self) -> Dict[str, dict]:
        if self._speakers is None:
            self._speakers = {k: dict(r, embedding=self._speaker_matrix[i])
                              for i, (k, r) in enumerate(zip(self.speaker_keys, self._speaker_records))}
        return self._speakers

    @property
    def datasets(self) -> List[str]:
        return sorted({r["dataset"] for r in self._records} | {r["dataset"] for r in self._speaker_records})

    def speaker_of(self, key: str) -> str:
        """Speaker key of an utterance key."""
        return self._records[self._index[key]]["speaker_key"]

    def matrix(self, level: str = "utterance", normalize: bool = False) -> Tuple[List[str], np.ndarray]:
        """(keys, N x D float32 matrix) of utterances or (``level="speaker"``) speakers, rows in key order."""
        if level not in ("utterance", "speaker"):
            raise ValueError("level must be 'utterance' or 'speaker'")
        keys, matrix = ((self.keys, self._matrix) if level == "utterance"
                        else (self.speaker_keys, self._speaker_matrix))
        return list(keys), (_normalize_rows(matrix) if normalize else matrix.copy())

    def speaker_labels(self) -> List[str]:
        """Speaker key of every utterance, in ``keys`` order."""
        return [r["speaker_key"] for r in self._records]

    def _labels_array(self) -> np.ndarray:
        if self._labels is None:
            self._labels = np.array(self.speaker_labels(), dtype=object)
        return self._labels

    def _unit(self) -> np.ndarray:
        if self._normed is None:
            self._normed = _normalize_rows(self._matrix)
        return self._normed

    def _speaker_unit(self) -> np.ndarray:
        if self._speaker_normed is None:
            self._speaker_normed = _normalize_rows(self._speaker_matrix)
        return self._speaker_normed

    # --- lookups ---
    def find_path(self, path) -> Optional[str]:
        """Utterance key of an audio file of this set (absolute, as given to the pipeline, or relative to
        the data root), or None."""
        if self._paths is None:
            self._paths = {}
            for key, record in zip(self.keys, self._records):
                if record.get("start") is not None:
                    continue  # segments of a longer file: the path alone does not name one
                for form in (record.get("path"), record.get("rel_path")):
                    if form:
                        self._paths.setdefault(str(form), key)
                if record.get("path"):
                    self._paths.setdefault(os.path.realpath(record["path"]), key)
        text = str(path)
        return self._paths.get(text) or self._paths.get(os.path.realpath(text))

    def _resolve(self, query):
        """-> (vector, utterance key or None, speaker key or None)."""
        if isinstance(query, (str, os.PathLike)):
            text = str(query)
            if text in self._index:
                return self._matrix[self._index[text]], text, self.speaker_of(text)
            if text in self._speaker_index:
                return self._speaker_matrix[self._speaker_index[text]], None, text
            key = self.find_path(text)
            if key is not None:
                return self._matrix[self._index[key]], key, self.speaker_of(key)
            if os.path.isfile(text):
                return self.model().embed(text), None, None
            raise KeyError(f"{text!r} is not an utterance key, a speaker key or an audio file of this set")
        return query_vector(query, self.dim), None, None

    def embedding(self, query) -> np.ndarray:
        """The vector of an utterance key, speaker key or audio file (embedded with ``model()`` if new)."""
        return self._resolve(query)[0]

    # --- similarity ---
    def similar(self, query, k: int = 10, same_speaker: Optional[bool] = None) -> List[Match]:
        """Top-k utterances by cosine to ``query`` (utterance key, speaker key, audio path or vector).

        ``same_speaker``: None = any utterance, True = only the query's speaker, False = only other
        speakers (needs a query whose speaker is known). The query utterance itself is left out.
        """
        vector, own_key, speaker = self._resolve(query)
        if same_speaker is not None and speaker is None:
            raise ValueError("same_speaker needs a query from this set (utterance key, speaker key or its path)")
        scores = self._unit() @ _normalize_rows(vector)
        keep = np.ones(len(self.keys), dtype=bool)
        if own_key is not None:
            keep[self._index[own_key]] = False
        if same_speaker is not None:
            mine = self._labels_array() == speaker
            keep &= mine if same_speaker else ~mine
        return _top(self.keys, scores, keep, k)

    def similar_speakers(self, query, k: int = 10) -> List[Match]:
        """Top-k speakers by cosine of their speaker embeddings to ``query`` (its own speaker left out)."""
        vector, _, speaker = self._resolve(query)
        scores = self._speaker_unit() @ _normalize_rows(vector)
        keep = np.ones(len(self.speaker_keys), dtype=bool)
        if speaker is not None and speaker in self._speaker_index:
            keep[self._speaker_index[speaker]] = False
        return _top(self.speaker_keys, scores, keep, k)

    def score(self, a, b) -> float:
        """Cosine of two queries (utterance keys, speaker keys, paths or vectors)."""
        return cosine(self.embedding(a), self.embedding(b))

    def speaker_similarity(self) -> Tuple[List[str], np.ndarray]:
        """(speaker keys, S x S cosine matrix of the speaker embeddings)."""
        unit = self._speaker_unit()
        return list(self.speaker_keys), np.clip(unit @ unit.T, -1.0, 1.0)

    # --- subsets ---
    def _subset(self, rows: Sequence[int], speakers: Optional[Iterable[str]] = None) -> "EmbeddingSet":
        rows = list(rows)
        wanted = set(speakers) if speakers is not None else {self._records[i]["speaker_key"] for i in rows}
        spk_rows = [i for i, s in enumerate(self.speaker_keys) if s in wanted]
        subset = EmbeddingSet([self.keys[i] for i in rows], self._matrix[rows], [self._records[i] for i in rows],
                              [self.speaker_keys[i] for i in spk_rows], self._speaker_matrix[spk_rows],
                              [self._speaker_records[i] for i in spk_rows], self.summary, self.directory)
        subset._model = self._model
        return subset

    def by_dataset(self, *names: str) -> "EmbeddingSet":
        """The utterances and speakers of the named dataset(s)."""
        unknown = [n for n in names if n not in self.datasets]
        if unknown or not names:
            raise KeyError(f"no dataset {', '.join(map(repr, unknown)) or '(none given)'}; "
                           f"datasets: {', '.join(self.datasets)}")
        wanted = set(names)
        rows = [i for i, r in enumerate(self._records) if r["dataset"] in wanted]
        return self._subset(rows, [s for s, r in zip(self.speaker_keys, self._speaker_records)
                                   if r["dataset"] in wanted])

    def by_speaker(self, *speakers: str, dataset: Optional[str] = None) -> "EmbeddingSet":
        """The utterances of speakers named by speaker key (``<dataset>_<speaker>``) or speaker id
        (in every dataset, or only in ``dataset``)."""
        if not speakers:
            raise KeyError("name at least one speaker")
        wanted = set()
        for name in speakers:
            found = {s for s, r in zip(self.speaker_keys, self._speaker_records)
                     if (s == name or r["speaker_id"] == name) and (dataset is None or r["dataset"] == dataset)}
            if not found:
                close = [s for s in self.speaker_keys if name in s][:5]
                raise KeyError(f"no speaker {name!r}" + (f" in dataset {dataset!r}" if dataset else "")
                               + (f"; did you mean {', '.join(close)}?" if close else ""))
            wanted |= found
        return self._subset([i for i, r in enumerate(self._records) if r["speaker_key"] in wanted], wanted)

    def filter(self, predicate) -> "EmbeddingSet":
        """The utterances whose record (a dict) satisfies ``predicate``."""
        return self._subset([i for i, r in enumerate(self._records) if predicate(r)])

    # --- the run's model ---
    def model(self, device=None, dtype: Optional[str] = None) -> SpeakerModel:
        """The model that made this set, with its settings, to embed new audio comparably."""
        if self._model is not None and device is None and dtype is None:
            return self._model
        from speakerlab.config import ModelConfig
        from speakerlab.models import load_model as build_and_load
        from speakerlab.zoo import sha256_of
        info = self.summary.get("model") or {}
        checkpoint = info.get("checkpoint")
        if not checkpoint or not info.get("config"):
            raise ValueError("the final dir's summary names no model; use speakerlab.load_model(...) and embed yourself")
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"the model of this set, {checkpoint}, is not there any more")
        if info.get("sha256") and sha256_of(checkpoint) != info["sha256"]:
            raise ValueError(f"{checkpoint} has changed since this set was made (sha256 differs)")
        raw = info["config"]
        config = ModelConfig(obj=raw["obj"], args=dict(raw.get("args") or {}),
                             sample_rate=int(raw.get("sample_rate", 16000)),
                             fbank_dim=int(raw.get("fbank_dim", 80)), source=f"{self.directory} (summary)")
        model = SpeakerModel(build_and_load(config, checkpoint), config, _pick_device(device),
                             dtype=dtype or self.summary.get("dtype", "auto"),
                             channels=self.summary.get("channels", "first"),
                             max_chunk_s=float(self.summary.get("max_chunk_s", 300.0)),
                             name=info.get("name", ""), checkpoint=checkpoint)
        if device is None and dtype is None:
            self._model = model
        return model


def load_embeddings(final_dir, allow_pickle: bool = False) -> EmbeddingSet:
    """Load a ``merge_embeddings.py`` output dir, checked against its completeness record.

    A dir with the npy set (``--formats npy``) opens as a ``mapped.MappedEmbeddingSet``: the matrix is
    memory-mapped, records are read on demand, queries run over blocks (same methods). Otherwise
    reads the pickle-free npz files; a dir that holds only pickles is read only with
    ``allow_pickle=True`` (unpickling can run code: only dirs you trust). Raises ``FileNotFoundError``
    for a missing dir and ``speakerlab.finaldir.FinalDirError`` (a ValueError) for an incomplete or
    altered one.
    """
    from speakerlab.finaldir import FinalDir
    final_dir = Path(final_dir)
    if not final_dir.is_dir():
        raise FileNotFoundError(f"{final_dir} is not a directory")
    final = FinalDir.open(final_dir)
    summary = final.summary()
    if final.has_npy():  # the set that scales: mapped, opened in constant time and memory
        from speakerlab.mapped import MappedEmbeddingSet
        mapped = MappedEmbeddingSet(final_dir, final.npy_files(), summary)
        mapped.model_factory = lambda device=None, dtype=None: EmbeddingSet.model(mapped, device, dtype)
        return mapped
    utt_list = {r["key"]: r for r in final.utterance_list()}
    spk_list = {r["key"]: r for r in final.speaker_list()}
    loaded = []
    for level, listing in (("utterance", utt_list), ("speaker", spk_list)):
        keys, matrix, entries = final.embeddings(level, allow_pickle)
        if entries is None:
            missing = [k for k in keys if k not in listing]
            if missing:
                raise ValueError(f"{final_dir}: the {level} npz has keys missing from its JSON list, e.g. {missing[0]}")
            records = [dict(listing[k]) for k in keys]
        else:
            records = []
            for key in keys:
                record = {f: v for f, v in entries[key].items() if f != "embedding"}
                if key in listing:
                    record = dict(listing[key], **record)
                records.append(record)
        loaded.append((keys, matrix, records))
    (keys, matrix, records), (spk_keys, spk_matrix, spk_records) = loaded
    for record in records:
        record.setdefault("key", None)
        record.setdefault("speaker_key", f"{record.get('dataset')}_{record.get('speaker_id')}")
    for key, record in zip(keys, records):
        record["key"] = key
    for key, record in zip(spk_keys, spk_records):
        record["key"] = key
    if matrix.shape[0] and spk_matrix.shape[0] and matrix.shape[1] != spk_matrix.shape[1]:
        raise ValueError(f"{final_dir}: utterance and speaker embeddings have different dimensions")
    return EmbeddingSet(keys, matrix, records, spk_keys, spk_matrix, spk_records, summary, final_dir)
