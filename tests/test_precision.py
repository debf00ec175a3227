"""Under bf16, the convolutions reading the fbank itself run in fp32 (see embedder.keep_feature_convs_fp32)."""
import torch

from speakerlab.config import load_config
from speakerlab.embedder import Embedder
from speakerlab.models import load_model


def test_feature_conv_runs_in_fp32_under_bf16(fixtures_dir):
    for name in ("campplus_tiny", "eres2netv2_tiny"):
        config = load_config(fixtures_dir / name / "config.yaml")
        reference = load_model(config, fixtures_dir / name / "model.ckpt")
        embedder = Embedder(load_model(config, fixtures_dir / name / "model.ckpt"), config,
                            torch.device("cpu"), dtype="bf16")
        convs = [(n, m) for n, m in embedder.model.named_modules()
                 if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)) and m.in_channels == 1]
        assert len(convs) == 1, name
        conv_name, conv = convs[0]
        ref_conv = reference.get_submodule(conv_name)
        x = torch.randn(2, 1, 80, 50)
        with torch.inference_mode():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = conv(x)
            want = ref_conv(x)
            assert got.dtype == torch.bfloat16
            # fp32 math rounded once at the end: within half a bf16 step of the fp32 result
            torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-6)
            torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-6)  # no autocast: fp32
        feats = torch.randn(1, 120, 80)
        with torch.inference_mode():
            cos = torch.nn.functional.cosine_similarity(
                embedder._forward(feats, torch.tensor([120]))[0], reference(feats)[0], dim=0)
        assert cos > 0.99, (name, float(cos))
