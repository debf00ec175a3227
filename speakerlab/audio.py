"""Decoding one file into the model's input: float32 mono at the model's sample rate.

Every problem becomes an ``AudioError(path, stage, reason)`` that the pipeline records; nothing here
kills a run. Decisions (documented in the README):
- integer PCM becomes float in [-1, 1) (soundfile scales by 2**(bits-1), as torchaudio does);
- several channels: the first one (what 3D-Speaker does), or their mean with ``channels='mean'``;
- any rate is resampled with soxr (high quality) to the model's rate;
- NaN/Inf samples and all-zero audio fail: the model has nothing to say about them, and an
  all-zero file would get the same meaningless embedding as every other silent file;
- so does audio without sound: a constant signal (a DC offset) or one whose RMS after DC removal is
  below ``SILENCE_FLOOR_DBFS``;
- implausible headers fail before any sample is read: a rate outside ``MIN_RATE``..``MAX_RATE`` (a
  header claiming 1 Hz would be resampled 16000-fold), or more than ``MAX_DURATION_S`` of audio.
"""
import errno
import math
import os
import stat
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


def check_regular_file(path: str) -> None:
    """Raise AudioError unless ``path`` (after symlinks) is a regular file: opening a named pipe
    would block forever, and a broken link or a link loop deserves its own reason."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        reasons = {errno.ENOENT: "file not found (deleted since the scan, or a broken symbolic link)",
                   errno.ELOOP: "symbolic link loop", errno.EACCES: "permission denied"}
        raise AudioError(path, "decode", reasons.get(exc.errno, exc.strerror or str(exc))) from None
    if not stat.S_ISREG(mode):
        kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a plain file")
        raise AudioError(path, "decode", f"not a regular file ({kind})")


def explain_open_error(path: str, exc: BaseException) -> str:
    """A reason a person understands for a file the decoder could not open or read.

    libsndfile reports an unreadable file as "System error" and an empty one as "Format not
    recognised"; look at the file itself before passing its words on."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with open(path, "rb"):
            pass
    except PermissionError:
        return "permission denied"
    except OSError as os_exc:
        return os_exc.strerror or str(os_exc)
    text = str(exc).strip() or type(exc).__name__
    prefix = f"Error opening {path!r}: "
    if text.startswith(prefix):
        text = text[len(prefix):]
    return f"not a readable audio file ({text.rstrip('.')})"


BLOCK_FRAMES = 1 << 20  # ~1 min at 16 kHz: a long many-channel file is never in memory whole

# Sample rates of real recordings: 8 kHz telephony down to 4 kHz (old corpora), up to 384 kHz (the
# highest rate of studio converters). Anything else is a damaged or forged header.
MIN_RATE, MAX_RATE = 4000, 384000
# One utterance of at most 4 hours (a one-hour file peaks at 1.6 GB with CAM++ on CPU; memory grows
# with the length). Longer recordings are embedded as segments: a --manifest with start/end.
MAX_DURATION_S = 4 * 3600.0
# The samples are decoded at the file's own rate before resampling: at most 4 hours' worth at 48 kHz
# (2.8 GB as float32), so a long 384 kHz file cannot ask for 22 GB.
MAX_SAMPLES = int(MAX_DURATION_S * 48000)
# RMS floor after DC removal, in dB relative to full scale. At -100 dBFS, 99% of the log mel energies
# of real speech sit at the fbank's floor (float32 epsilon), so the model sees near-constant features;
# 16-bit audio's own rounding noise is -101 dBFS, and real speech, even quiet, is at -60 to -20 dBFS.
SILENCE_FLOOR_DBFS = -100.0


def header_problem(rate: int, frames: int) -> str:
    """Why a header (rate, frame count of the part to read) cannot be real audio, or ''."""
    if not MIN_RATE <= rate <= MAX_RATE:
        return (f"implausible sample rate {rate} Hz in the header (accepted: {MIN_RATE} to {MAX_RATE} Hz); "
                "the header is damaged")
    if frames / rate > MAX_DURATION_S:
        return (f"{frames / rate / 3600:.1f} hours of audio, over the {MAX_DURATION_S / 3600:g}-hour limit for "
                "one utterance; cut it into segments (a --manifest with start/end)")
    if frames > MAX_SAMPLES:
        return (f"{frames} samples at {rate} Hz, over the {MAX_SAMPLES} samples (4 hours at 48 kHz) decoded "
                "for one utterance; cut it into segments (a --manifest with start/end)")
    return ""


def check_content(wave: np.ndarray, label: str) -> None:
    """Refuse audio without sound: all zero, constant (a DC offset), or quieter than the floor."""
    if not np.any(wave):
        raise AudioError(label, "validate", "all samples are zero (silent audio has no speaker)")
    mean = float(np.mean(wave, dtype=np.float64))
    energy = 0.0
    for first in range(0, len(wave), BLOCK_FRAMES):  # float64 (tiny values square to 0 in float32), in blocks
        block = wave[first:first + BLOCK_FRAMES].astype(np.float64) - mean
        energy += float(np.einsum("i,i->", block, block))  # not BLAS: its idle threads spin in decode workers
    if energy == 0.0:
        raise AudioError(label, "validate", f"constant signal: every sample is {wave[0]:.6g} (a DC offset, no sound)")
    level = 10.0 * math.log10(energy / len(wave))
    if level < SILENCE_FLOOR_DBFS:
        raise AudioError(label, "validate", f"near-silent: {level:.1f} dBFS RMS after DC removal, below the "
                                            f"{SILENCE_FLOOR_DBFS:g} dBFS floor (no sound to embed)")


def decode(path: str, start: Optional[float] = None, end: Optional[float] = None,
           channels: str = "first"):
    """Mono float32 samples (first channel, or the mean of all) and the file's rate.

    Reads only [start, end) when given, block by block, so an hour of 8-channel audio costs one
    channel's memory. Any NaN/Inf sample (in any channel) fails the file."""
    import soundfile as sf
    check_regular_file(path)
    blocks = []
    bad, first_bad = 0, None
    try:
        with sf.SoundFile(path) as handle:
            rate = handle.samplerate
            first = 0 if start is None else max(0, int(round(start * rate)))
            last = -1 if end is None else int(round(end * rate))
            if first >= handle.frames > 0:
                raise AudioError(path, "decode", f"segment starts at {start} s, after the end of the "
                                                 f"file ({handle.frames / rate:.3f} s)")
            wanted = (handle.frames if last < 0 else min(last, handle.frames)) - first
            problem = header_problem(rate, max(wanted, 0))
            if problem:  # before a single block is read or resampled
                raise AudioError(path, "validate", problem)
            if first:
                handle.seek(first)
            remaining = -1 if last < 0 else max(0, last - first)
            done = 0
            while remaining != 0:
                want = BLOCK_FRAMES if remaining < 0 else min(BLOCK_FRAMES, remaining)
                data = handle.read(frames=want, dtype="float32", always_2d=True)
                if not len(data):
                    break
                finite = np.isfinite(data).all(axis=1)
                if not finite.all():
                    if first_bad is None:
                        first_bad = done + int(np.argmin(finite))
                    bad += int((~np.isfinite(data)).sum())
                blocks.append(data.mean(axis=1, dtype=np.float32) if channels == "mean" and data.shape[1] > 1
                              else data[:, 0].copy())
                done += len(data)
                if remaining > 0:
                    remaining -= len(data)
    except AudioError:
        raise
    except Exception as exc:  # LibsndfileError, RuntimeError, OSError (permissions), TypeError ...
        raise AudioError(path, "decode", explain_open_error(path, exc)) from None
    if bad:
        raise AudioError(path, "validate", f"contains {bad} NaN or Inf sample value(s), the first at "
                                           f"{first_bad / rate:.3f} s")
    wave = blocks[0] if len(blocks) == 1 else np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return wave, rate


def load_audio(path: str, sample_rate: int, channels: str = "first",
               start: Optional[float] = None, end: Optional[float] = None) -> np.ndarray:
    wave, rate = decode(path, start, end, channels)
    if wave.shape[0] == 0:
        raise AudioError(path, "decode", "no audio samples (empty or truncated file)")
    return finish_wave(wave, rate, sample_rate, path)


def finish_wave(wave: np.ndarray, rate: int, sample_rate: int, label: str) -> np.ndarray:
    """Mono float samples -> the model's input: implausible rates and lengths, silence and constant
    signals refused, resampled to ``sample_rate``.
    Shared by files (load_audio) and in-memory arrays (the Python API)."""
    problem = header_problem(rate, len(wave))
    if problem:
        raise AudioError(label, "validate", problem)
    check_content(wave, label)
    if rate != sample_rate:
        try:
            import soxr
            wave = soxr.resample(wave, rate, sample_rate, quality="HQ")
        except Exception as exc:
            raise AudioError(label, "resample", f"{rate} Hz -> {sample_rate} Hz failed: {exc}") from None
    return np.ascontiguousarray(wave, dtype=np.float32)
