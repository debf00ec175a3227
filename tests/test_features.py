import numpy as np
import torch

from speakerlab.features import Fbank, FbankConfig, kaldi_mel_banks


def test_fbank_matches_kaldi(fixtures_dir):
    fbank = Fbank(FbankConfig(mean_norm=False))
    waves = np.load(fixtures_dir / "fbank" / "waves.npz")
    expected = np.load(fixtures_dir / "fbank" / "expected.npz")
    for key in waves.files:
        feats, frames = fbank(torch.from_numpy(waves[key]))
        assert feats.shape[1:] == expected[key].shape and int(frames[0]) == expected[key].shape[0]
        assert np.abs(feats[0].numpy() - expected[key]).max() <= 1e-3, key


def test_batched_fbank_equals_one_at_a_time(fixtures_dir):
    fbank = Fbank()
    waves = np.load(fixtures_dir / "fbank" / "waves.npz")
    keys = waves.files
    longest = max(len(waves[k]) for k in keys)
    batch = torch.full((len(keys), longest), 0.3)  # padding must not matter whatever it holds
    lengths = torch.tensor([len(waves[k]) for k in keys])
    for row, key in enumerate(keys):
        batch[row, :len(waves[key])] = torch.from_numpy(waves[key])
    feats, frames = fbank(batch, lengths)
    for row, key in enumerate(keys):
        alone, _ = fbank(torch.from_numpy(waves[key]))
        n = int(frames[row])
        np.testing.assert_allclose(feats[row, :n].numpy(), alone[0].numpy(), atol=1e-5)
        assert torch.all(feats[row, n:] == 0)


def test_mean_normalisation_is_per_utterance_mean_subtraction(fixtures_dir):
    wave = torch.from_numpy(np.load(fixtures_dir / "fbank" / "waves.npz")["n16000"])
    raw, _ = Fbank(FbankConfig(mean_norm=False))(wave)
    normed, _ = Fbank()(wave)
    np.testing.assert_allclose(normed[0].numpy(), (raw[0] - raw[0].mean(0)).numpy(), atol=1e-5)


def test_chunked_framing_equals_unchunked():
    wave = torch.randn(16000 * 3) * 0.1
    whole, _ = Fbank(max_frames_per_chunk=100000)(wave)
    pieces, _ = Fbank(max_frames_per_chunk=7)(wave)
    np.testing.assert_allclose(whole.numpy(), pieces.numpy(), atol=1e-5)


def test_too_short_gives_no_frames():
    feats, frames = Fbank()(torch.zeros(399))
    assert feats.shape[1] == 0 and int(frames[0]) == 0


def test_mel_banks_shape_and_nyquist_column():
    mel = kaldi_mel_banks(80, 512, 16000)
    assert mel.shape == (257, 80)
    assert torch.all(mel[-1] == 0) and torch.all(mel.sum(0) > 0)
