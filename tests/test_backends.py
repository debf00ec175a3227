"""Every engine, dtype and layout gives the fp32 torch path's embeddings, for every model family, on
mixed-length batches; ``auto`` picks among them by measuring (speakerlab/calibration.py)."""
import gc
import json
import sys
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
def test_model_traces_for_every_length(fixtures_dir, name):
    """The export's premise, checked without OpenVINO: one trace of the model on a padded batch
    computes the eager model for other batch sizes, lengths and paddings (nothing baked in)."""
    config = load_config(fixtures_dir / name / "config.yaml")
    model = load_model(config, fixtures_dir / name / "model.ckpt")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lengths = torch.tensor([233, 150])  # CAM++: two 100-frame segments and a part after its stride 2
        traced = torch.jit.trace(backends._Traced(model), (torch.randn(2, 233, 80), lengths), check_trace=False)
        for frames, lens in ((311, [311, 200, 37]), (129, [129]), (101, [101, 60])):
            x = torch.randn(len(lens), frames, 80)
            lens = torch.tensor(lens)
            want = model(x, lens)
            got = traced(x, lens)
            assert got.shape == want.shape
            assert torch.nn.functional.cosine_similarity(got, want).min() >= 0.99999, (name, frames)


@needs_openvino
@pytest.mark.skipif(not backends.openvino_bf16(), reason="OpenVINO has no bf16 here")
@pytest.mark.parametrize("name", FAMILIES)
def test_openvino_bf16_runs_the_stem_in_fp32(fixtures_dir, cache, name):
    """Under a bf16 hint, the conv that reads the fbank runs (and hands on) fp32, the others bf16:
    what OpenVINO actually compiled, read from its runtime graph in execution order."""
    config = load_config(fixtures_dir / name / "config.yaml")
    engine = backends.OpenVINOModel(load_model(config, fixtures_dir / name / "model.ckpt"), "bf16")
    runtime = engine.compiled.get_runtime_model().get_ordered_ops()
    convs = sorted((int(op.get_rt_info()["execOrder"].astype(str)), op.get_rt_info()["runtimePrecision"].astype(str))
                   for op in runtime if op.get_rt_info()["layerType"].astype(str) == "Convolution")
    assert convs[0][1] == "f32", convs[:3]
    assert {p for _, p in convs[1:]} == {"bf16"}, convs


def test_export_marks_one_conv_as_the_stem(fixtures_dir):
    """mark_stem_precise refuses a graph where the stem is not one conv (what it marks is checked)."""
    pytest.importorskip("openvino")
    import openvino as ov
    x = ov.opset8.parameter([1, 1, 8, 8], ov.Type.f32)
    w = ov.opset8.constant(np.ones((2, 1, 3, 3), np.float32))
    conv = ov.opset8.convolution(x, w, [1, 1], [1, 1], [1, 1], [1, 1])
    relu = ov.opset8.relu(ov.opset8.convolution(conv, ov.opset8.constant(np.ones((2, 2, 1, 1), np.float32)),
                                                [1, 1], [0, 0], [0, 0], [1, 1]))
    with pytest.raises(backends.BackendError, match="one Convolution, found 2"):
        backends.mark_stem_precise(ov.Model([relu], [x]))
    good = ov.Model([ov.opset8.relu(conv)], [x])
    assert sorted(backends.mark_stem_precise(good)) == ["Constant", "Convolution", "Parameter", "Relu"]
    assert all("precise_0" in op.get_rt_info() for op in good.get_ordered_ops() if op.get_type_name() != "Result")


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


def test_without_openvino_auto_measures_torch_only(monkeypatch):
    monkeypatch.setattr(backends, "openvino_version", lambda: None)
    assert {b for b, _ in calibration.candidates("auto", "auto")} == {"torch"}
    assert calibration.candidates("fp32", "auto") == [("torch", "fp32")]


def rig_measure(monkeypatch, fastest, cosines=None):
    """The real measurement (engines built, cosines computed), with ``fastest`` made the fastest and
    ``cosines`` overriding measured cosines: the choice is then known whatever the load."""
    real = calibration.measure

    def rigged(embedder, options, streams):
        ms, cos = real(embedder, options, streams)
        return {k: (1.0 if k == fastest else 50.0) for k in ms}, {**cos, **(cosines or {})}

    monkeypatch.setattr(calibration, "measure", rigged)


@needs_openvino
@pytest.mark.parametrize("fastest", ["openvino/fp32", "torch/fp32"])
def test_auto_picks_openvino_or_torch_by_measurement_and_says_why(fixtures_dir, cache, monkeypatch, fastest):
    rig_measure(monkeypatch, fastest)
    first = build(fixtures_dir, "campplus_tiny", dtype="auto", backend="auto")
    choice = first.choice
    assert f"{first.backend}/{first.dtype}" == fastest and (first.engine is not None) == (first.backend == "openvino")
    assert {"torch/fp32", "openvino/fp32"} <= set(choice["candidates"]) == set(choice["probe_ms"])
    assert choice["probe_ms"][fastest] == 1.0 and "measured on this machine now" in choice["why"]
    assert set(choice["build_s"]) == {c for c in choice["candidates"] if c.startswith("openvino/")}
    assert all(choice["cosine_to_fp32"][c] >= calibration.MIN_COSINE_FP32 for c in choice["candidates"]
               if c.endswith("/fp32"))
    # the next process reads the choice (OpenVINO's export and compiled blob are cached too)
    second = build(fixtures_dir, "campplus_tiny", dtype="auto", backend="auto")
    assert (second.backend, second.dtype) == (first.backend, first.dtype) and "read from" in second.choice["why"]
    assert (second.engine is not None) == (second.backend == "openvino")


@needs_openvino
def test_fp32_from_another_engine_must_be_fp32_close(fixtures_dir, cache, monkeypatch):
    """--dtype fp32 promises cosine 0.9999 to torch fp32: an engine that is fastest but only 0.9995
    close (fine for bf16) is not chosen; OpenVINO's own precision hint is f32 when fp32 is asked
    (its CPU default is bf16 where the CPU has bf16)."""
    rig_measure(monkeypatch, "openvino/fp32", {"openvino/fp32": 0.9995})
    assert build(fixtures_dir, "campplus_tiny", dtype="fp32", backend="auto").backend == "torch"
    embedder = build(fixtures_dir, "campplus_tiny", dtype="fp32", backend="openvino")
    assert embedder.engine.compiled is None  # compiled at prepare() (the pipeline: after its workers fork)
    embedder.prepare()
    engine = embedder.engine
    assert str(engine.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32")


def dangling_signal_stack() -> str:
    """What is wrong with this thread's alternate signal stack (Linux): "" when it is off or mapped."""
    import ctypes

    class Stack(ctypes.Structure):
        _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]

    stack = Stack()
    if ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack)) != 0 or stack.flags & 2:  # SS_DISABLE
        return ""
    try:
        spans = [[int(x, 16) for x in line.split()[0].split("-")] for line in open("/proc/self/maps")]
    except OSError:  # not Linux: nothing to check
        return ""
    return "" if any(lo <= stack.sp < hi for lo, hi in spans) else f"signal stack at {stack.sp:#x} is unmapped"


CORES_RELEASED_OUT_OF_ORDER = r"""
import gc, os, signal, sys
from speakerlab import backends
from speakerlab.config import load_config
from speakerlab.models import load_model

model = load_model(load_config(sys.argv[1] + "/config.yaml"), sys.argv[1] + "/model.ckpt")
first = backends.OpenVINOModel(model, "fp32")   # as a calibration does: engines made in turn,
second = backends.OpenVINOModel(model, "fp32")  # the first (a loser) released first
del first; gc.collect()
del second; gc.collect()

from tests.test_backends import dangling_signal_stack
assert not dangling_signal_stack(), dangling_signal_stack()
seen = []
signal.signal(signal.SIGCHLD, lambda *args: seen.append(args[0]))  # as torch's DataLoader does
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print("survived", len(seen))
"""


@needs_openvino
def test_openvino_leaves_a_valid_signal_stack(fixtures_dir, cache):
    """The cause of the segfault that kept OpenVINO out of auto: each ``openvino.Core`` swaps the
    thread's signal stack and unmaps it when freed, so two released out of order left a dangling
    one and the next SIGCHLD (a decode worker exiting) killed the process. Run in a child process:
    a regression kills that child, not the test session."""
    from tests.helpers import run_cli
    r = run_cli([sys.executable, "-c", CORES_RELEASED_OUT_OF_ORDER, fixtures_dir / "campplus_tiny"], timeout=300)
    assert r.returncode == 0 and "survived 1" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


def in_process_extract(argv, monkeypatch):
    from speakerlab.extract import main
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "SLURM_PROCID", "SLURM_JOB_ID", "SPEAKERLAB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    return main([str(a) for a in argv])


def merged_embeddings(output_dir, final_dir):
    from speakerlab import merge
    merge.merge([output_dir], final_dir, ["npz"])
    with np.load(final_dir / "utterance_embeddings.npz", allow_pickle=False) as data:
        return dict(zip(map(str, data["keys"]), data["embeddings"]))


@needs_openvino
def test_extraction_forks_decode_workers_after_openvino_ran_here(fixtures_dir, tmp_path, cache, monkeypatch):
    """The crash as it was met: OpenVINO engines made, run and released (out of order) in this
    process, then an in-process extraction with decode workers; it completes, and its embeddings
    are the torch fp32 path's."""
    from tests.helpers import tiny_model_args, tone, write_wav
    first = build(fixtures_dir, "campplus_tiny", dtype="fp32", backend="openvino")
    second = build(fixtures_dir, "campplus_tiny", dtype="fp32", backend="openvino")
    embed(first, [tone(1.3)])
    embed(second, [tone(0.9)])
    del first  # released in the order they were made (as a calibration's loser goes first)
    gc.collect()
    del second
    gc.collect()
    assert not dangling_signal_stack()  # what made the next child's exit (SIGCHLD) kill the process
    for i in range(6):
        write_wav(tmp_path / "data" / "ds" / f"spk{i % 2}" / f"u{i}.wav",
                  tone(0.5 + 0.45 * i, seed=i, freq=140 + 25 * i))
    common = ["--data_root", tmp_path / "data", *tiny_model_args(fixtures_dir), "--dtype", "fp32", "--no_progress"]
    assert in_process_extract([*common, "--output_dir", tmp_path / "ov", "--backend", "openvino",
                               "--num_workers", "2"], monkeypatch) == 0
    gc.collect()
    assert not dangling_signal_stack()
    meta = json.loads((tmp_path / "ov" / "rank_00" / "metadata.json").read_text())
    assert meta["engine"]["backend"] == "openvino" and meta["batch_policy"]["num_workers"] == 2
    # and once its engines are gone, a torch run forks decode workers too (the crash hit a later test)
    assert in_process_extract([*common, "--output_dir", tmp_path / "torch", "--backend", "torch",
                               "--num_workers", "2"], monkeypatch) == 0
    got = merged_embeddings(tmp_path / "ov", tmp_path / "ov_final")
    want = merged_embeddings(tmp_path / "torch", tmp_path / "torch_final")
    assert sorted(got) == sorted(want) and len(want) == 6
    keys = sorted(want)
    cos = cos_rows([got[k] for k in keys], [want[k] for k in keys])
    assert cos.min() >= 0.9999, cos.round(6).tolist()


@needs_openvino
def test_an_engine_that_does_not_compile_says_what_to_do(fixtures_dir, cache, monkeypatch):
    embedder = build(fixtures_dir, "campplus_tiny", dtype="fp32", backend="openvino")

    def broken(*args, **kwargs):
        raise RuntimeError("blob unreadable")

    monkeypatch.setattr(backends.openvino_core(), "compile_model", broken, raising=False)
    with pytest.raises(RuntimeError, match="blob unreadable") as raised:
        embedder.prepare()
    told = str(embedder.engine_failure(raised.value))
    assert "did not compile from" in told and "blob unreadable" in told and "--backend torch" in told


OPENVINO_WITHOUT_TOOLS = """
import sys
import torch
from speakerlab import backends
backends.openvino_core()  # what running an engine imports
print("runtime:", "openvino.tools.ovc" in sys.modules, "openvino_telemetry" in sys.modules)
model = torch.nn.Sequential(torch.nn.Linear(4, 3))
converted = backends.convert_model(torch.jit.trace(model, torch.randn(2, 4)), example_input=torch.randn(2, 4))
compiled = backends.openvino_core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
x = torch.randn(2, 4)
ok = torch.allclose(torch.from_numpy(compiled([x.numpy()])[0]), model(x).detach(), atol=1e-5)
print("export:", "openvino.tools.ovc" in sys.modules, "openvino_telemetry" in sys.modules, ok)
import openvino as ov  # the user's own conversions still find openvino.convert_model
from openvino import convert_model as users
print("user:", users(torch.jit.trace(model, torch.randn(2, 4)), example_input=torch.randn(2, 4)) is not None)
"""


@needs_openvino
def test_openvino_runs_without_its_conversion_tools_and_telemetry():
    """Running an engine imports OpenVINO's runtime only: its model-conversion tools cost 0.1 s of
    each start-up, and their import sends a telemetry event from a forked process. An export imports
    the converter, still without the telemetry package (the converter uses its own stub)."""
    from tests.helpers import run_cli
    r = run_cli([sys.executable, "-c", OPENVINO_WITHOUT_TOOLS], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "runtime: False False" in r.stdout and "export: True False True" in r.stdout, r.stdout
    assert "user: True" in r.stdout, r.stdout
