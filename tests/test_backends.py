"""Every engine, dtype and layout gives the fp32 torch path's embeddings, for every model family, on
mixed-length batches; ``auto`` picks among them by measuring (speakerlab/calibration.py)."""
import json
import warnings

import numpy as np
import pytest
import torch

from speakerlab import backends, calibration
from speakerlab.audio import load_audio
from speakerlab.config import load_config
from speakerlab.embedder import Embedder
from speakerlab.models import load_model
from speakerlab.models.fusion import mkldnn_bf16_supported

FAMILIES = ("campplus_tiny", "eres2net_tiny", "eres2netv2_tiny", "eres2netv2_w24s4ep4_tiny")
needs_openvino = pytest.mark.skipif(backends.openvino_version() is None,
                                    reason="OpenVINO not installed (pip install .[openvino])")


def cos_rows(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def waves(fixtures_dir):
    """Real speech of mixed lengths (0.4 s to the full segments), one batch: padding everywhere."""
    files = sorted((fixtures_dir / "campplus_sample" / "data").rglob("*.wav"))
    out = [load_audio(str(f), 16000) for f in files[:5]]
    out.append(out[0][:6400])
    out.append(out[1][:int(2.37 * 16000)])
    return out


def build(fixtures_dir, name, **kwargs):
    config = load_config(fixtures_dir / name / "config.yaml")
    return Embedder(load_model(config, fixtures_dir / name / "model.ckpt"), config, torch.device("cpu"), **kwargs)


def embed(embedder, waves):
    results = embedder.embed_waves(waves)
    assert all(r.error is None for r in results), [r.error for r in results]
    return np.stack([r.embedding for r in results])


@pytest.fixture(scope="module")
def reference(fixtures_dir, waves):
    """fp32 torch, unfused, contiguous: the models as the reference computes them."""
    return {name: embed(build(fixtures_dir, name, dtype="fp32", backend="torch", fuse=False, channels_last=False),
                        waves) for name in FAMILIES}


ENGINES = [
    pytest.param(dict(dtype="fp32", backend="torch"), 0.9999, id="torch-fp32-fused-default-layout"),
    pytest.param(dict(dtype="fp32", backend="torch", channels_last=False), 0.9999, id="torch-fp32-contiguous"),
    pytest.param(dict(dtype="fp32", backend="torch", fuse=False, channels_last=True), 0.9999,
                 id="torch-fp32-unfused-channels-last"),
    pytest.param(dict(dtype="bf16", backend="torch"), 0.999, id="torch-bf16",
                 marks=pytest.mark.skipif(not mkldnn_bf16_supported(), reason="no native bf16 on this CPU")),
    pytest.param(dict(dtype="fp32", backend="openvino"), 0.9999, id="openvino-fp32", marks=needs_openvino),
    pytest.param(dict(dtype="bf16", backend="openvino"), 0.999, id="openvino-bf16", marks=[
        needs_openvino, pytest.mark.skipif(not backends.openvino_bf16(), reason="OpenVINO has no bf16 here")]),
]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("kwargs,bound", ENGINES)
def test_engine_equals_fp32_torch(fixtures_dir, waves, reference, name, kwargs, bound):
    embedder = build(fixtures_dir, name, **kwargs)
    assert (embedder.backend, embedder.dtype) == (kwargs["backend"], kwargs["dtype"])  # given: never overridden
    got = embed(embedder, waves)
    cos = cos_rows(got, reference[name])
    assert cos.min() >= bound, (name, kwargs, cos.round(6).tolist())
    # and one at a time, unpadded: batching stays invisible on every engine
    alone = embed(embedder, waves[-1:])
    assert cos_rows(alone, got[-1:])[0] >= bound


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_body_traces_for_every_length(fixtures_dir, name):
    """The export's premise, checked without OpenVINO: one trace of ``forward_body`` on a padded batch
    computes the eager model for other batch sizes, lengths and paddings (nothing baked in)."""
    config = load_config(fixtures_dir / name / "config.yaml")
    model = load_model(config, fixtures_dir / name / "model.ckpt")
    body = backends._Body(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lengths = torch.tensor([233, 150])  # CAM++: two 100-frame segments and a part after its stride 2
        traced = torch.jit.trace(body, (model.forward_stem(torch.randn(2, 233, 80), lengths), lengths),
                                 check_trace=False)
        for frames, lens in ((311, [311, 200, 37]), (129, [129]), (101, [101, 60])):
            x = torch.randn(len(lens), frames, 80)
            lens = torch.tensor(lens)
            want = model(x, lens)
            got = traced(model.forward_stem(x, lens), lens)
            assert got.shape == want.shape
            assert torch.nn.functional.cosine_similarity(got, want).min() >= 0.99999, (name, frames)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh calibration cache; the (slow, deterministic) exports are shared with the real cache."""
    from speakerlab.zoo import cache_dir
    exports = cache_dir() / "openvino"
    exports.mkdir(parents=True, exist_ok=True)
    (tmp_path / "openvino").symlink_to(exports, target_is_directory=True)
    monkeypatch.setenv("SPEAKERLAB_CACHE", str(tmp_path))
    return tmp_path


def test_auto_measures_once_then_reads_the_cache(fixtures_dir, cache):
    first = build(fixtures_dir, "campplus_tiny", dtype="auto", backend="auto")
    options = calibration.candidates("auto", "auto")
    assert (first.backend, first.dtype) in options
    if len(options) == 1:
        assert first.choice["why"] == "the only candidate on this machine"
        return
    ms = first.choice["probe_ms"]
    assert set(ms) == {"/".join(o) for o in options}
    fastest = min((k for k in ms if first.choice["cosine_to_fp32"][k] >= calibration.MIN_COSINE), key=ms.get)
    assert f"{first.backend}/{first.dtype}" == fastest  # never the slower of what was measured
    files = list((cache / "calibration").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["backend"] == first.backend
    second = build(fixtures_dir, "campplus_tiny", dtype="auto", backend="auto")
    assert (second.backend, second.dtype) == (first.backend, first.dtype)
    assert "read from" in second.choice["why"] and second.choice["probe_ms"] == ms
    other = build(fixtures_dir, "eres2net_tiny", dtype="auto", backend="auto")  # another model: measured anew
    assert "measured on this machine now" in other.choice["why"]


def test_auto_never_picks_an_inaccurate_candidate(fixtures_dir, cache, monkeypatch):
    """A candidate that fails the cosine check on the probe loses even when it is fastest."""
    monkeypatch.setattr(calibration, "candidates", lambda dtype, backend: [("torch", "fp32"), ("torch", "fp16")])
    real = calibration.measure

    def rigged(embedder, options, streams):
        ms, cosines = real(embedder, options, streams)
        ms["torch/fp16"], cosines["torch/fp16"] = 0.001, 0.5
        return ms, cosines

    monkeypatch.setattr(calibration, "measure", rigged)
    chosen = build(fixtures_dir, "campplus_tiny", dtype="auto", backend="auto")
    assert (chosen.backend, chosen.dtype) == ("torch", "fp32")


def test_engine_arguments_are_checked(fixtures_dir, cache, monkeypatch):
    with pytest.raises(ValueError, match="backend must be"):
        build(fixtures_dir, "campplus_tiny", backend="tensorrt")
    monkeypatch.setattr(backends, "openvino_version", lambda: None)
    with pytest.raises(ValueError, match="needs OpenVINO"):
        build(fixtures_dir, "campplus_tiny", backend="openvino")
    # without OpenVINO, auto falls back to torch
    assert build(fixtures_dir, "campplus_tiny", dtype="fp32", backend="auto").backend == "torch"
