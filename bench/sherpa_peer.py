"""sherpa-onnx as a speed peer of the throughput bench (bench only, never a package dependency).

sherpa-onnx's ``SpeakerEmbeddingExtractor`` (C++: its own Kaldi-style fbank, then ONNX Runtime) loads
an ONNX model of one input, fbank (1, T, 80), and one output, the embedding (1, D), and reads how
to make the features from the model's metadata (keys learnt from its model loader):

  framework               "3d-speaker" (or "wespeaker"): which extractor; anything else is refused
  sample_rate             the rate its fbank runs at (other rates it resamples itself)
  output_dim              the embedding size it reports as ``dim``
  normalize_samples       1: samples in [-1, 1] as given (0: scaled to 16-bit integers first)
  language                required, informational
  feature_normalize_type  "global-mean": each utterance's fbank minus its mean over time (3D-Speaker's)

``export_for_sherpa`` writes such a model from *our* modules and weights (the same network as every
other row of the bench), cached under ``$SPEAKERLAB_CACHE/bench/sherpa-onnx`` by the weights' digest
and the library versions. Its fbank differs from the reference's (no edge snipping, a -400 Hz high
cut-off), so its embeddings are near ours, not equal: a speed peer only.

    pip install -c constraints.txt -r bench/requirements-sherpa.txt
"""
import hashlib
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

# bump when the exported graph or its metadata change: part of the cache key
EXPORT_FORMAT = 1
INSTALL_HINT = "pip install -c constraints.txt -r bench/requirements-sherpa.txt"
DEFAULT_THREADS = 2  # issue 14's setting: sherpa-onnx on the 2-core machine, 2 ONNX Runtime threads
WHAT_IS_TIMED = ("loop time only (model load, export and one warm-up file excluded): per file, soundfile "
                 "decode (first channel, float32), soxr HQ resample to the model rate where needed (as "
                 "(a) and (b) do), then sherpa-onnx's stream (its fbank, global-mean normalisation) and "
                 "ONNX Runtime at batch 1")


def sherpa_version() -> Optional[str]:
    """The installed sherpa-onnx version, or None when it is not installed (nothing is imported)."""
    from importlib import metadata
    try:
        return metadata.version("sherpa-onnx")
    except metadata.PackageNotFoundError:
        return None


def sherpa_metadata(config, language: str, comment: str) -> dict:
    """The metadata sherpa-onnx's 3D-Speaker extractor reads (see the module's docstring)."""
    return {"framework": "3d-speaker", "sample_rate": str(config.sample_rate),
            "output_dim": str(config.embedding_size), "normalize_samples": "1",
            "feature_normalize_type": "global-mean", "language": language, "comment": comment}


def read_metadata(path) -> dict:
    import onnx
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def feats_only(model):
    """The model called on fbank alone, as sherpa-onnx feeds it (one utterance, no padding, so no
    lengths)."""
    import torch

    class FeatsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    return FeatsOnly(model).eval()


def export_for_sherpa(model, config, path, language: str = "unknown", comment: str = "") -> Path:
    """Write ``model`` (one of ours, any state: an unfused fp32 copy is exported) as the ONNX model
    sherpa-onnx loads: input x (N, T, feat_dim) with N and T dynamic, output embedding (N, D), and the
    metadata above. Written beside ``path`` and renamed into place, so a reader never sees half a file."""
    import onnx
    import torch
    from speakerlab.backends import _fresh_copy
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = feats_only(_fresh_copy(model))
    example = torch.randn(1, 233, config.fbank_dim, generator=torch.Generator().manual_seed(0))
    fd, tmp = tempfile.mkstemp(suffix=".onnx.part", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shape arithmetic: handled in the models
            torch.onnx.export(wrapped, (example,), tmp, dynamo=False, input_names=["x"],
                              output_names=["embedding"], opset_version=17,
                              dynamic_axes={"x": {0: "N", 1: "T"}, "embedding": {0: "N"}})
        proto = onnx.load(tmp)
        for key, value in sherpa_metadata(config, language, comment).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def cache_root() -> Path:
    from speakerlab import zoo
    return zoo.cache_dir() / "bench" / "sherpa-onnx"


def cached_export(model_path, config, language: str = "unknown", root: Optional[Path] = None):
    """(path, seconds spent exporting, whether it was cached): the export of a checkpoint, keyed by
    its sha256, the feature setup and the torch / onnx versions."""
    import onnx
    import torch
    from speakerlab import zoo
    from speakerlab.models import load_model
    key = "|".join([zoo.sha256_of(model_path), str(config.sample_rate), str(config.fbank_dim),
                    str(config.embedding_size), language, torch.__version__, onnx.__version__,
                    str(EXPORT_FORMAT)])
    path = Path(root or cache_root()) / f"{Path(model_path).stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.onnx"
    if path.is_file():
        return path, 0.0, True
    started = time.perf_counter()
    export_for_sherpa(load_model(config, model_path), config, path, language,
                      comment=f"exported by speakerlab-extract's bench from {Path(model_path).name}")
    return path, time.perf_counter() - started, False


def make_extractor(onnx_path, threads: int = DEFAULT_THREADS):
    import sherpa_onnx
    config = sherpa_onnx.SpeakerEmbeddingExtractorConfig(model=str(onnx_path), num_threads=threads,
                                                         provider="cpu")
    if not config.validate():
        raise RuntimeError(f"{onnx_path}: sherpa-onnx refuses this model config")
    return sherpa_onnx.SpeakerEmbeddingExtractor(config)


def embed(extractor, wave: np.ndarray, sample_rate: int) -> Optional[np.ndarray]:
    """One utterance through sherpa-onnx (its fbank + model); None when too short for a frame."""
    stream = extractor.create_stream()
    stream.accept_waveform(sample_rate, wave)
    stream.input_finished()
    if not extractor.is_ready(stream):
        return None
    return np.asarray(extractor.compute(stream), dtype=np.float32)


def decode(path, sample_rate: int) -> np.ndarray:
    """As a sherpa-onnx user's loop reads a file: soundfile, first channel, float32; then soxr HQ
    to the model's rate (what (a) and (b) do, so every row embeds the same samples)."""
    import soundfile as sf
    wave, rate = sf.read(str(path), dtype="float32", always_2d=True)
    wave = np.ascontiguousarray(wave[:, 0])
    if rate != sample_rate:
        import soxr
        wave = soxr.resample(wave, rate, sample_rate, quality="HQ").astype(np.float32, copy=False)
    return wave


def run_loop(extractor, utterances, sample_rate: int):
    """(keys, embeddings, audio seconds, loop seconds) over ``utterances`` (objects with .key and
    .path), one file at a time, everything in the loop timed (see WHAT_IS_TIMED)."""
    keys, embs, audio_s = [], [], 0.0
    started = time.perf_counter()
    for utt in utterances:
        wave = decode(utt.path, sample_rate)
        emb = embed(extractor, wave, sample_rate)
        if emb is None:
            continue
        keys.append(utt.key)
        embs.append(emb)
        audio_s += len(wave) / sample_rate
    return keys, embs, audio_s, time.perf_counter() - started
