"""CAM++: parity with 3D-Speaker fixtures, padding invariance, min_frames, checkpoint loading."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from speakerlab.models.campplus import CAMPPlus

KEYS = ("x0", "x1", "x2")

def _released_checkpoint() -> Path:
    """The default model in the cache (.ci/run fetches it first; the slow tests fetch it too)."""
    from speakerlab import zoo
    return zoo.cache_dir() / zoo.DEFAULT_MODEL.name


RELEASED_CKPT = _released_checkpoint()


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    folder = fixtures_dir / "campplus_tiny"
    with open(folder / "config.yaml") as f:
        args = yaml.safe_load(f)["embedding_model"]["args"]
    model = CAMPPlus(**args).eval()
    model.load_state_dict(torch.load(folder / "model.ckpt", weights_only=True), strict=True)
    inputs = np.load(folder / "inputs.npz")
    expected = np.load(folder / "expected.npz")
    return (model,
            {k: torch.from_numpy(inputs[k]).float() for k in KEYS},
            {k: torch.from_numpy(expected[k]).float() for k in KEYS})


def _pad(feats, value=0.0):
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
    batch = torch.full((len(feats), int(lengths.max()), feats[0].shape[1]), value)
    for i, f in enumerate(feats):
        batch[i, :f.shape[0]] = f
    return batch, lengths


def _assert_close(got, want, atol):
    cos = F.cosine_similarity(got, want, dim=-1).item()
    assert cos >= 0.99999, cos
    assert (got - want).abs().max().item() <= atol


@torch.no_grad()
def test_single_utterance_parity(tiny):
    model, inputs, expected = tiny
    for k in KEYS:
        out = model(inputs[k].unsqueeze(0))
        assert out.shape == (1, expected[k].shape[0])
        _assert_close(out[0], expected[k], atol=1e-4)


@torch.no_grad()
def test_lengths_equal_to_t_is_plain_forward(tiny):
    model, inputs, _ = tiny
    x = inputs["x1"].unsqueeze(0)
    full = torch.tensor([x.shape[1]])
    assert torch.equal(model(x), model(x, full))


@torch.no_grad()
def test_batched_fixture_inputs(tiny):
    model, inputs, expected = tiny
    feats = [inputs[k] for k in KEYS]
    batch, lengths = _pad(feats, value=5.0)  # non-zero padding must not leak either
    out = model(batch, lengths)
    for i, k in enumerate(KEYS):
        alone = model(feats[i].unsqueeze(0))[0]
        _assert_close(out[i], alone, atol=1e-5)
        _assert_close(out[i], expected[k], atol=1e-4)


@torch.no_grad()
def test_batched_random_lengths(tiny):
    model = tiny[0]
    gen = torch.Generator().manual_seed(0)
    # min_frames, odd lengths, and both sides of the 100-frame CAM segment boundary
    # (segments are counted after the stride-2 TDNN: 199/200/201/202 frames -> 100/100/101/101).
    lengths = [model.min_frames, 4, 7, 99, 100, 101, 199, 200, 201, 202, 250, 333]
    feats = [torch.randn(n, 80, generator=gen) for n in lengths]
    batch, lens = _pad(feats, value=-3.0)
    out = model(batch, lens)
    assert torch.isfinite(out).all()
    for i, f in enumerate(feats):
        _assert_close(out[i], model(f.unsqueeze(0))[0], atol=1e-5)


@torch.no_grad()
def test_min_frames(tiny):
    model = tiny[0]
    assert model.min_frames == 3
    gen = torch.Generator().manual_seed(1)
    assert torch.isfinite(model(torch.randn(1, model.min_frames, 80, generator=gen))).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the zero degrees of freedom
        short = model(torch.randn(1, model.min_frames - 1, 80, generator=gen))
    assert not torch.isfinite(short).all()


@torch.no_grad()
def test_autocast_bf16(tiny):
    model, inputs, _ = tiny
    batch, lengths = _pad([inputs[k] for k in KEYS])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch, lengths)
    ref = model(batch, lengths)
    assert torch.isfinite(out).all()
    assert F.cosine_similarity(out.float(), ref, dim=-1).min().item() > 0.99


def test_state_dict_layout_matches_reference():
    # Default config: spot-check names/shapes of the released 3D-Speaker layout.
    sd = CAMPPlus(embedding_size=192).state_dict()
    assert len(sd) == 937
    assert sd["head.conv1.weight"].shape == (32, 1, 3, 3)
    assert sd["xvector.tdnn.linear.weight"].shape == (128, 320, 5)
    assert sd["xvector.block2.tdnnd24.cam_layer.linear_local.weight"].shape == (32, 128, 3)
    assert sd["xvector.transit3.linear.weight"].shape == (512, 1024, 1)
    assert sd["xvector.dense.linear.weight"].shape == (192, 1024, 1)
    assert "xvector.dense.nonlinear.batchnorm.weight" not in sd  # non-affine BN
    assert "head.layer1.1.shortcut.0.weight" not in sd  # identity shortcut


@pytest.mark.skipif(not RELEASED_CKPT.is_file(), reason="released CAM++ checkpoint not present")
@torch.no_grad()
def test_released_checkpoint_loads_strictly():
    model = CAMPPlus(embedding_size=192).eval()
    sd = torch.load(RELEASED_CKPT, map_location="cpu", weights_only=True)
    model.load_state_dict(sd, strict=True)
    gen = torch.Generator().manual_seed(2)
    feats = [torch.randn(n, 80, generator=gen) for n in (150, 240)]
    batch, lengths = _pad(feats)
    out = model(batch, lengths)
    assert out.shape == (2, 192)
    for i, f in enumerate(feats):
        _assert_close(out[i], model(f.unsqueeze(0))[0], atol=1e-4)
