"""Decoding one file into the model's input: float32 mono at the model's sample rate.

Every problem becomes an ``AudioError(path, stage, reason)`` that the pipeline records; nothing here
kills a run. Decisions (documented in the README):
- integer PCM becomes float in [-1, 1) (soundfile scales by 2**(bits-1), as torchaudio does);
- several channels: the first one (what 3D-Speaker does), or their mean with ``channels='mean'``;
- any rate is resampled with soxr (high quality) to the model's rate;
- NaN/Inf samples and all-zero audio fail: the model has nothing to say about them, and an
  all-zero file would get the same meaningless embedding as every other silent file.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class AudioError(Exception):
    path: str
    stage: str   # header | decode | validate | resample | features | model
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.stage}: {self.reason}"

    def to_dict(self):
        return {"path": self.path, "stage": self.stage, "reason": self.reason}


def decode(path: str, start: Optional[float] = None, end: Optional[float] = None):
    """(samples, channels) float32 and the file's rate; reads only [start, end) when given."""
    import soundfile as sf
    try:
        with sf.SoundFile(path) as handle:
            rate = handle.samplerate
            first = 0 if start is None else max(0, int(round(start * rate)))
            last = -1 if end is None else int(round(end * rate))
            if first >= handle.frames > 0:
                raise AudioError(path, "decode", f"segment starts at {start} s, after the end of the "
                                                 f"file ({handle.frames / rate:.3f} s)")
            if first:
                handle.seek(first)
            count = -1 if last < 0 else max(0, last - first)
            data = handle.read(frames=count, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as exc:  # LibsndfileError, RuntimeError, OSError (permissions), TypeError ...
        reason = str(exc).strip() or type(exc).__name__
        if isinstance(exc, PermissionError):
            reason = "permission denied"
        raise AudioError(path, "decode", reason) from None
    return data, rate


def load_audio(path: str, sample_rate: int, channels: str = "first",
               start: Optional[float] = None, end: Optional[float] = None) -> np.ndarray:
    data, rate = decode(path, start, end)
    if data.shape[0] == 0:
        raise AudioError(path, "decode", "no audio samples (empty or truncated file)")
    if not np.isfinite(data).all():
        raise AudioError(path, "validate", "contains NaN or Inf samples")
    wave = data.mean(axis=1) if channels == "mean" else data[:, 0]
    if not np.any(wave):
        raise AudioError(path, "validate", "all samples are zero (silent audio has no speaker)")
    if rate != sample_rate:
        try:
            import soxr
            wave = soxr.resample(wave, rate, sample_rate, quality="HQ")
        except Exception as exc:
            raise AudioError(path, "resample", f"{rate} Hz -> {sample_rate} Hz failed: {exc}") from None
    return np.ascontiguousarray(wave, dtype=np.float32)
