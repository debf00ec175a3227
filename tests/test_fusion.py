"""conv + BatchNorm + activation fused for inference (models/fusion.py) computes what the
separate modules compute: fp32 to rounding, every model family, padded mixed-length batches,
through oneDNN and through the plain fallback used on GPUs."""
import pytest
import torch
import torch.nn.functional as F

from speakerlab.config import load_config
from speakerlab.embedder import Embedder
from speakerlab.models import fusion, load_model

FAMILIES = ("campplus_tiny", "eres2net_tiny", "eres2netv2_tiny", "eres2netv2_w24s4ep4_tiny")


def perturbed_model(fixtures_dir, name, seed=0):
    """The fixture model with non-trivial BatchNorm statistics and affines, so folding matters."""
    config = load_config(fixtures_dir / name / "config.yaml")
    model = load_model(config, fixtures_dir / name / "model.ckpt")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
                if module.affine:
                    module.weight.copy_(0.7 + 0.6 * torch.rand(n, generator=gen))
                    module.bias.copy_(0.2 * torch.randn(n, generator=gen))
    return config, model.eval()


def mixed_batch(config, seed=1):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([230, 97, 160, 41])
    x = torch.randn(len(lengths), int(lengths.max()), config.fbank_dim, generator=gen)
    return x, lengths


def run(model, x, lengths, fused, channels_last=False, dtype=None):
    fusion.enable_fusion(model, fused)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        if dtype is None:
            return model(x, lengths)
        with torch.autocast("cpu", dtype=dtype):
            return model(x, lengths).float()


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mkldnn", [True, False], ids=["onednn", "fallback"])
def test_fused_fp32_equals_separate_modules(fixtures_dir, monkeypatch, name, mkldnn):
    if mkldnn and not fusion.mkldnn_available():
        pytest.skip("this torch build has no oneDNN")
    if not mkldnn:
        monkeypatch.setattr(fusion, "mkldnn_available", lambda: False)
    config, model = perturbed_model(fixtures_dir, name)
    x, lengths = mixed_batch(config)
    eager = run(model, x, lengths, fused=False)
    for channels_last in (False, True):
        fused = run(model, x, lengths, fused=True, channels_last=channels_last)
        scale = float(eager.abs().max())
        assert float((fused - eager).abs().max()) <= 2e-5 * scale, (name, channels_last)
        assert float(F.cosine_similarity(fused, eager).min()) > 0.99999
    # and each padded row is still its own utterance alone
    for row in range(len(lengths)):
        alone = run(model, x[row:row + 1, :int(lengths[row])], None, fused=True)
        assert float(F.cosine_similarity(alone, eager[row:row + 1]).min()) > 0.99999, (name, row)


@pytest.mark.parametrize("name", ("campplus_tiny", "eres2netv2_tiny"))
def test_fused_bf16_stays_close_to_fp32(fixtures_dir, name):
    config, model = perturbed_model(fixtures_dir, name)
    x, lengths = mixed_batch(config)
    reference = run(model, x, lengths, fused=False)
    fused = run(model, x, lengths, fused=True, channels_last=True, dtype=torch.bfloat16)
    assert float(F.cosine_similarity(fused, reference).min()) > 0.999


def test_state_dict_untouched_and_reloaded_weights_refolded(fixtures_dir):
    config, model = perturbed_model(fixtures_dir, "eres2netv2_tiny")
    keys = list(model.state_dict())
    x, lengths = mixed_batch(config)
    first = run(model, x, lengths, fused=True)
    assert list(model.state_dict()) == keys  # folded weights are a cache, not parameters
    _, other = perturbed_model(fixtures_dir, "eres2netv2_tiny", seed=7)
    model.load_state_dict(other.state_dict())
    fusion.enable_fusion(model)  # re-enabling is not needed for correctness, only re-loading is
    refolded = run(model, x, lengths, fused=True)
    want = run(other, x, lengths, fused=False)
    assert float((refolded - want).abs().max()) <= 2e-5 * float(want.abs().max())
    assert float((refolded - first).abs().max()) > 1e-3


def test_loading_after_fusion_is_noticed(fixtures_dir):
    config, model = perturbed_model(fixtures_dir, "campplus_tiny")
    x, lengths = mixed_batch(config)
    run(model, x, lengths, fused=True)  # fills the cache
    _, other = perturbed_model(fixtures_dir, "campplus_tiny", seed=3)
    model.load_state_dict(other.state_dict())  # in-place copies bump the parameters' versions
    with torch.inference_mode():
        got = model(x, lengths)
    want = run(other, x, lengths, fused=False)
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())


def test_embedder_fuses_and_keeps_the_feature_conv_fp32(fixtures_dir):
    config = load_config(fixtures_dir / "campplus_tiny" / "config.yaml")
    embedder = Embedder(load_model(config, fixtures_dir / "campplus_tiny" / "model.ckpt"), config,
                        torch.device("cpu"), dtype="bf16")
    head = embedder.model.head
    assert getattr(head.conv1, fusion._FLAG) and getattr(head.conv1, fusion._KEEP_FP32)
    x = torch.randn(2, 1, config.fbank_dim, 50).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = F.relu(head.bn1(F.conv2d(x, head.conv1.weight, None, 1, 1)))  # fp32, unfused
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fusion.conv_bn(head.conv1, head.bn1, x, "relu")
    assert got.dtype == torch.bfloat16
    # fp32 math rounded once at the end: within half a bf16 step of the fp32 result
    torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-5)


def test_negative_batchnorm_scales(fixtures_dir):
    """A BatchNorm with negative channel scales (4 of 56 pre-activation ones in the released CAM++)
    folds like any other."""
    config, model = perturbed_model(fixtures_dir, "campplus_tiny")
    with torch.no_grad():
        model.xvector.block1.tdnnd1.nonlinear2.batchnorm.weight[3] = -0.8
        model.head.bn1.weight[0] = -1.1
        model.xvector.transit2.nonlinear.batchnorm.weight[0] = -1.1
    x, lengths = mixed_batch(config)
    eager = run(model, x, lengths, fused=False)
    fused = run(model, x, lengths, fused=True, channels_last=True)
    assert float((fused - eager).abs().max()) <= 2e-5 * float(eager.abs().max())


def test_bf16_without_channels_last_and_partial_fusion(fixtures_dir):
    """Fused bf16 on (B, C, F, T) maps in default memory (oneDNN's add+relu fallback there has no
    bf16 kernel), and a CAM++ whose 1-D trunk runs as (B, C, 1, T) while some of its convs are not
    fused (they take the squeeze/unsqueeze route)."""
    config, model = perturbed_model(fixtures_dir, "campplus_tiny")
    x, lengths = mixed_batch(config)
    reference = run(model, x, lengths, fused=False)
    got = run(model, x, lengths, fused=True, dtype=torch.bfloat16)
    assert float(F.cosine_similarity(got, reference).min()) > 0.999
    fusion.enable_fusion(model)
    fusion.enable_fusion(model.xvector.block2, False)
    with torch.inference_mode():
        partial = model(x, lengths)
    assert float((partial - reference).abs().max()) <= 2e-5 * float(reference.abs().max())


def test_model_made_under_inference_mode(fixtures_dir):
    config = load_config(fixtures_dir / "eres2netv2_tiny" / "config.yaml")
    with torch.inference_mode():
        model = load_model(config, fixtures_dir / "eres2netv2_tiny" / "model.ckpt")
        x, lengths = mixed_batch(config)
        want = model(x, lengths)
        fusion.enable_fusion(model)
        got = model(x, lengths)
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())


def test_onednn_self_check_is_not_fooled_by_autocast():
    fusion.mkldnn_available.cache_clear()
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            first = fusion.mkldnn_available()
        assert first == (torch.backends.mkldnn.is_available()
                         and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))
    finally:
        fusion.mkldnn_available.cache_clear()
