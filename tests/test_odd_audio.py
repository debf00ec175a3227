"""Audio without sound and implausible headers fail with a reason (README "Decisions on odd audio"),
and a lying header is refused before anything is decoded or resampled."""
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from speakerlab import audio
from speakerlab.audio import AudioError, finish_wave, load_audio
from speakerlab.data import Utterance, read_header
from tests.helpers import tone, write_wav
from tests.test_bad_inputs import with_rate


def refused(path, stage="validate", **kwargs) -> str:
    with pytest.raises(AudioError) as info:
        load_audio(str(path), 16000, **kwargs)
    assert info.value.stage == stage and info.value.path == str(path)
    return info.value.reason


def test_constant_signal_fails(tmp_path):
    for value in (0.25, -0.5, 1 / 32768):
        path = write_wav(tmp_path / "dc.wav", np.full(16000, value, np.float32))
        assert "constant signal" in refused(path) and "DC offset" in refused(path)
    assert "all samples are zero" in refused(write_wav(tmp_path / "z.wav", np.zeros(800, np.float32)))


@pytest.mark.parametrize("scale, fails", [(1e-38, True), (1e-5, True), (2e-4, False), (1.0, False)])
def test_energy_floor(tmp_path, scale, fails):
    """tone() is at -22 dBFS: x1e-38 is -782 dBFS, x1e-5 -122 (fail); x2e-4 -96 and x1 pass."""
    wave = tone(1.0, seed=1) * np.float32(scale)
    path = write_wav(tmp_path / "t.wav", wave, subtype="FLOAT")
    if fails:
        reason = refused(path)
        assert "near-silent" in reason and "below the -100 dBFS floor" in reason, reason
    else:
        assert load_audio(str(path), 16000).shape == (16000,)


def test_a_dc_offset_does_not_hide_quiet_sound_or_silence(tmp_path):
    quiet = np.float32(0.5) + tone(1.0, seed=2) * np.float32(1e-3)     # -80 dBFS of sound on a DC offset
    assert load_audio(str(write_wav(tmp_path / "q.wav", quiet, subtype="FLOAT")), 16000).shape == (16000,)
    hidden = np.float32(0.5) + tone(1.0, seed=2) * np.float32(1e-7)   # changes no float32 sample: constant
    assert "constant signal" in refused(write_wav(tmp_path / "h.wav", hidden, subtype="FLOAT"))


def test_real_speech_is_far_above_the_floor(fixtures_dir):
    """The floor's margin on real (telephone) speech, at its quietest 1 s window."""
    path = sorted((fixtures_dir / "campplus_sample").rglob("*.wav"))[0]
    wave, _ = sf.read(str(path), dtype="float32")
    windows = [wave[i:i + 16000] - wave[i:i + 16000].mean() for i in range(0, len(wave) - 16000, 8000)]
    quietest = min(10 * np.log10(np.mean(w.astype(np.float64) ** 2)) for w in windows)
    assert quietest > audio.SILENCE_FLOOR_DBFS + 30


def test_header_claiming_1_hz_is_refused_before_decoding(tmp_path, monkeypatch):
    good = write_wav(tmp_path / "good.wav", tone(2.0, seed=3))
    path = tmp_path / "hz1.wav"
    path.write_bytes(with_rate(good.read_bytes(), 1))
    assert sf.info(str(path)).samplerate == 1  # 32000 samples "at 1 Hz": 8.9 hours, 512M samples at 16 kHz

    def no_resampling(*args, **kwargs):
        raise AssertionError("resampled")

    import soxr
    monkeypatch.setattr(soxr, "resample", no_resampling)
    tracemalloc.start()
    reason = refused(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "implausible sample rate 1 Hz" in reason and "4000 to 384000" in reason
    assert peak < 1 << 20, peak   # not even the file's own 64 KB of samples were read
    utt = Utterance(key="k", dataset="d", speaker="s", utterance="u", path=str(path))
    read_header(utt)
    assert utt.sample_rate == 1 and "implausible sample rate" in utt.header_error
    assert utt.duration == 0.0  # no weight in sharding


@pytest.mark.parametrize("rate, ok", [(3999, False), (4000, True), (384000, True), (384001, False)])
def test_rate_limits(tmp_path, rate, ok):
    good = write_wav(tmp_path / "good.wav", tone(2.0, seed=4))
    path = tmp_path / "r.wav"
    path.write_bytes(with_rate(good.read_bytes(), rate))
    if ok:
        assert len(load_audio(str(path), 16000)) == pytest.approx(32000 * 16000 / rate, abs=2)
    else:
        assert "implausible sample rate" in refused(path)


def test_duration_cap_is_checked_on_the_header_and_per_segment(tmp_path, monkeypatch):
    monkeypatch.setattr(audio, "MAX_DURATION_S", 1.5)
    path = write_wav(tmp_path / "long.wav", tone(2.0, seed=5))
    monkeypatch.setattr(audio, "BLOCK_FRAMES", 1)  # a read would take forever: the check comes first
    reason = refused(path)
    assert "hours of audio, over the" in reason and "--manifest with start/end" in reason
    monkeypatch.setattr(audio, "BLOCK_FRAMES", 1 << 20)
    assert len(load_audio(str(path), 16000, start=0.5, end=1.5)) == 16000   # a segment under the cap
    utt = Utterance(key="k", dataset="d", speaker="s", utterance="u", path=str(path))
    read_header(utt)
    assert "over the" in utt.header_error


def test_in_memory_arrays_get_the_same_checks():
    with pytest.raises(AudioError, match="implausible sample rate 1 Hz"):
        finish_wave(tone(0.5), 1, 16000, "array")
    with pytest.raises(AudioError, match="constant signal"):
        finish_wave(np.full(8000, 0.1, np.float32), 16000, 16000, "array")
    with pytest.raises(AudioError, match="near-silent"):
        finish_wave(tone(0.5) * np.float32(1e-38), 16000, 16000, "array")


def test_sample_cap_at_high_rates(tmp_path, monkeypatch):
    """At 384 kHz, 4 hours would be 22 GB of float32 before resampling: samples are capped as well."""
    monkeypatch.setattr(audio, "MAX_SAMPLES", 20000)
    path = write_wav(tmp_path / "hi.wav", tone(0.5, rate=96000, seed=6), rate=96000)   # 48000 samples
    assert "48000 samples at 96000 Hz, over the 20000 samples" in refused(path)
    assert len(load_audio(str(path), 16000, start=0.0, end=0.2)) == 3200
