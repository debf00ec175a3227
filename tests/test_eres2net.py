"""ERes2Net / ERes2NetV2: parity with 3D-Speaker fixtures and padding-invisible batching."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from speakerlab.models.eres2net import ERes2Net, ERes2NetHuge
from speakerlab.models.eres2netv2 import ERes2NetV2

FIXTURE_MODELS = ["eres2net_tiny", "eres2netv2_tiny", "eres2netv2_w24s4ep4_tiny"]
CLASSES = {"ERes2Net": ERes2Net, "ERes2NetV2": ERes2NetV2}


def _build(config_path):
    spec = yaml.safe_load(config_path.read_text())["embedding_model"]
    return CLASSES[spec["obj"].rsplit(".", 1)[-1]](**spec["args"])


@pytest.fixture(scope="module", params=FIXTURE_MODELS)
def bundle(request, fixtures_dir):
    folder = fixtures_dir / request.param
    model = _build(folder / "config.yaml")
    state = torch.load(folder / "model.ckpt", map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    with np.load(folder / "inputs.npz") as z:
        inputs = {k: torch.from_numpy(z[k]).float() for k in z.files}
    with np.load(folder / "expected.npz") as z:
        expected = {k: torch.from_numpy(z[k]).float().reshape(-1) for k in z.files}
    return model, inputs, expected


def _pad(feats, fill=0.0):
    lengths = torch.tensor([f.shape[0] for f in feats])
    batch = torch.full((len(feats), int(lengths.max()), feats[0].shape[1]), fill)
    for i, f in enumerate(feats):
        batch[i, : f.shape[0]] = f
    return batch, lengths


def _cos(a, b):
    return F.cosine_similarity(a.float().reshape(1, -1), b.float().reshape(1, -1)).item()


@torch.no_grad()
def test_single_utterance_matches_reference(bundle):
    model, inputs, expected = bundle
    for key, feats in inputs.items():
        got = model(feats.unsqueeze(0))[0]
        assert got.shape == expected[key].shape
        assert _cos(got, expected[key]) >= 0.99999, key
        assert (got - expected[key]).abs().max().item() <= 1e-4, key


@torch.no_grad()
def test_batched_fixture_inputs_match_batch1(bundle):
    model, inputs, _ = bundle
    feats = list(inputs.values())
    # Junk in the padding must not matter: the model re-zeroes it itself.
    batch, lengths = _pad(feats, fill=7.0)
    out = model(batch, lengths)
    for i, f in enumerate(feats):
        single = model(f.unsqueeze(0))[0]
        assert _cos(out[i], single) >= 0.99999
        assert (out[i] - single).abs().max().item() <= 1e-5


@torch.no_grad()
def test_batched_random_lengths_match_batch1(bundle):
    model, _, _ = bundle
    gen = torch.Generator().manual_seed(0)
    lengths = [model.min_frames, 37, 64, 65, 123, 200, 10, 17]
    feats = [torch.randn(n, 80, generator=gen) for n in lengths]
    batch, lens = _pad(feats, fill=-3.0)
    out = model(batch, lens)
    assert torch.isfinite(out).all()
    for i, f in enumerate(feats):
        single = model(f.unsqueeze(0))[0]
        assert _cos(out[i], single) >= 0.99999, lengths[i]
        assert (out[i] - single).abs().max().item() <= 1e-5, lengths[i]


@torch.no_grad()
def test_full_lengths_take_fast_path(bundle):
    model, _, _ = bundle
    x = torch.randn(3, 40, 80)
    full = torch.full((3,), 40, dtype=torch.long)
    assert model.stage_masks(full, 40, x.device) == [None] * 4
    torch.testing.assert_close(model(x, full), model(x), rtol=0, atol=0)


@torch.no_grad()
def test_min_frames_is_smallest_finite_length(bundle):
    model, _, _ = bundle
    # 3 stride-2 stages: 9 -> 5 -> 3 -> 2 pooled frames; 8 -> 1 frame -> unbiased var is NaN.
    assert model.min_frames == 9
    assert torch.isfinite(model(torch.randn(1, model.min_frames, 80))).all()
    with pytest.warns(UserWarning):  # torch warns about var with a single degree of freedom
        short = model(torch.randn(1, model.min_frames - 1, 80))
    assert not torch.isfinite(short).all()


@torch.no_grad()
def test_channels_last_bf16_autocast(bundle):
    model, inputs, _ = bundle
    feats = list(inputs.values())
    batch, lengths = _pad(feats)
    ref = model(batch, lengths)
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(batch, lengths)
        out_full = fast(batch)
    assert out.shape == ref.shape and torch.isfinite(out).all() and torch.isfinite(out_full).all()
    for i in range(len(feats)):
        assert _cos(out[i], ref[i]) >= 0.99


# ------------------------------------------------ variants without fixtures (random weights)


def _randomise_bn(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            mod.running_mean.copy_(torch.rand(mod.running_mean.shape, generator=gen) * 0.6 - 0.3)
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
    return model.eval()


@pytest.mark.parametrize("cls,kwargs", [
    (ERes2Net, dict(m_channels=4, embedding_size=32, two_emb_layer=True)),
    (ERes2Net, dict(m_channels=4, embedding_size=32, pooling_func="ASTP")),
    (ERes2Net, dict(m_channels=4, embedding_size=32, pooling_func="TSDP")),
    (ERes2NetHuge, dict(m_channels=4, embedding_size=32)),
    (ERes2NetV2, dict(m_channels=4, embedding_size=32, two_emb_layer=True, pooling_func="TAP")),
])
@torch.no_grad()
def test_variants_batched_parity(cls, kwargs):
    torch.manual_seed(0)
    model = _randomise_bn(cls(**kwargs))
    feats = [torch.randn(n, 80) for n in (model.min_frames, 30, 51, 96)]
    batch, lengths = _pad(feats, fill=2.0)
    out = model(batch, lengths)
    for i, f in enumerate(feats):
        single = model(f.unsqueeze(0))[0]
        assert _cos(out[i], single) >= 0.99999
        assert (out[i] - single).abs().max().item() <= 1e-5


# Parameter counts of 3D-Speaker's released configurations, measured on the reference classes.
@pytest.mark.parametrize("cls,kwargs,count", [
    (ERes2Net, dict(feat_dim=80, embedding_size=192), 6_632_029),
    (ERes2Net, dict(feat_dim=80, embedding_size=512, m_channels=64), 29_059_293),
    (ERes2NetHuge, dict(feat_dim=80, embedding_size=192), 55_234_879),
    (ERes2NetV2, dict(feat_dim=80, embedding_size=192, baseWidth=26, scale=2, expansion=2),
     17_896_745),
    (ERes2NetV2, dict(feat_dim=80, embedding_size=192, baseWidth=24, scale=4, expansion=4),
     53_588_221),
])
def test_released_config_sizes(cls, kwargs, count):
    with torch.device("meta"):
        model = cls(**kwargs)
    assert sum(t.numel() for t in model.state_dict().values()) == count
