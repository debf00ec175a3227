"""Optional CPU engines for the model, exported from our own modules (``pip install .[openvino]``).

The torch path stays the reference and the fallback. OpenVINO runs the same network faster on CPU
(its own graph fusion and kernels; measured in bench/, see README "Throughput"): the whole model,
fbank features in, embedding out, is traced from our modules (``forward_stem`` then
``forward_body``, padding masked exactly as in torch, dynamic batch and length) and converted once
per model, torch and OpenVINO version into ``$SPEAKERLAB_CACHE/openvino/``. The stem -- the first
conv, which reads the fbank, with its BatchNorm, ReLU and input mask -- is marked ``precise`` in the
graph, so OpenVINO runs it in fp32 under a bf16 precision hint, as the torch path keeps it (rounding
the fbank is where most of bf16's error comes from: OpenVINO all-bf16 gave CAM++ cosine 0.99924 to
fp32 on real speech, with the fp32 stem 0.99967). Until export version 1 the stem ran in torch and
only the body in OpenVINO; handing OpenVINO the stem's 32-channel fp32 map cost a copy and a layout
conversion per batch, and CAM++ bf16 ran 1.37x faster whole (measured: 112x -> 153x real time per
single-threaded stream, batches of 4 x 15 s).
"""
import hashlib
import logging
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

log = logging.getLogger("speakerlab")

BACKENDS = ("torch", "openvino")
# Bumped when the exported graph changes, so cached exports are redone (2: the whole model, stem marked precise).
EXPORT_VERSION = 2
PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


class BackendError(RuntimeError):
    pass


def _import_openvino():
    """``import openvino`` without its model-conversion tools (``openvino.tools.ovc``), which running
    a model does not need: importing them cost 0.1 s of every run's start-up, and their import sends
    a usage event to OpenVINO's telemetry from a process forked off a background thread (in the middle
    of our start-up, beside the decode workers). ``convert_model`` imports them when an export needs it."""
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    held = "openvino.tools.ovc" not in sys.modules
    if held:
        sys.modules["openvino.tools.ovc"] = None  # openvino's __init__ then skips it (ImportError, caught)
    try:
        import openvino
    finally:
        if held and sys.modules.get("openvino.tools.ovc", False) is None:
            del sys.modules["openvino.tools.ovc"]
    if held and not hasattr(openvino, "convert_model"):  # for the user's own `ov.convert_model`: on first call
        def convert_model(*args, **kwargs):
            from openvino.tools.ovc import convert_model as convert
            openvino.convert_model = convert
            return convert(*args, **kwargs)
        openvino.convert_model = convert_model
    return openvino


def convert_model(*args, **kwargs):
    """``openvino.convert_model``; OpenVINO's usage telemetry is left out of this process (its
    ``openvino_telemetry`` package is hidden while the converter imports, so it uses its own stub)."""
    held = "openvino.tools.ovc" not in sys.modules and "openvino_telemetry" not in sys.modules
    if held:
        sys.modules["openvino_telemetry"] = None
    try:
        from openvino.tools.ovc import convert_model as convert
    finally:
        if held and sys.modules.get("openvino_telemetry", False) is None:
            del sys.modules["openvino_telemetry"]
    return convert(*args, **kwargs)


def openvino_version() -> Optional[str]:
    """OpenVINO's version when it is installed and imports, else None."""
    try:
        openvino = _import_openvino()
    except Exception:  # not installed, or a broken install: the torch path serves
        return None
    return getattr(openvino, "__version__", None) or openvino.get_version()


_core = None
_core_lock = threading.Lock()
_primed = threading.Event()  # set once an inference has completed in this process


def openvino_core():
    """The process's one ``openvino.Core``, made on first use and never destroyed.

    Why one, kept for good: each Core loads its own CPU plugin, and the plugin's constructor swaps
    the calling thread's alternate signal stack (sigaltstack) for a fresh mmap'd one, while its
    destructor munmaps that stack and restores the previous one only when its own is still current.
    Two Cores released out of order (A, B made; A freed, then B) leave the thread's signal stack
    pointing at A's unmapped memory; the next signal with a Python handler (Python installs them
    SA_ONSTACK: the DataLoader's SIGCHLD when a decode worker or any child exits) then kills the
    process, or, once that address is mapped again, writes its frame over live data -- the
    intermittent segfault of issue 14 (a pytest process that had calibrated OpenVINO died in a
    later test when a child process exited). One Core, never freed, keeps the plugin's stack
    mapped until the process ends; a reference held by the interpreter itself (not only by this
    module) keeps interpreter shutdown from freeing it while DataLoader workers are still reaped.
    """
    global _core
    if _core is None:
        with _core_lock:
            if _core is None:
                import ctypes
                ov = _import_openvino()
                core = ov.Core()
                ctypes.pythonapi.Py_IncRef(ctypes.py_object(core))  # immortal: see above
                # OpenVINO's Type.to_dtype fills a C++ function-local static on first use and takes
                # the GIL inside it: two threads making the process's first inference at once (two
                # model streams, choice read from the calibration cache) deadlocked. Filled here, once.
                for kind in (ov.Type.f32, ov.Type.i64, ov.Type.bf16):
                    kind.to_dtype()
                _core = core
    return _core


def openvino_bf16() -> bool:
    """Whether OpenVINO's CPU plugin offers bf16 inference here."""
    try:
        caps = openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:
        return False
    return "BF16" in [str(c).upper() for c in caps]


def model_digest(model: torch.nn.Module) -> str:
    """sha1 of the model class, its tensors' names, shapes and bytes: the model's identity in caches."""
    digest = hashlib.sha1(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class _Traced(torch.nn.Module):
    """What is traced: the whole model, fbank (B, T, F) and valid frame counts (B,) in."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model.forward_body(self.model.forward_stem(feats, lengths), lengths)


def mark_stem_precise(graph) -> list:
    """Mark the stem -- the first Convolution's ReLU and everything it is computed from (the fbank's
    transpose, the padding mask, the conv with its folded BatchNorm) -- as ``precise``: OpenVINO then
    keeps it in fp32 under a bf16 precision hint. Returns the marked op types. The serializer turns
    the ``precise_0`` key into OpenVINO's DisableFP16Compression attribute in the saved IR."""
    ops = graph.get_ordered_ops()
    first_conv = next((i for i, op in enumerate(ops) if op.get_type_name() == "Convolution"), None)
    relu = next((op for op in ops[first_conv:] if op.get_type_name() == "Relu"), None) \
        if first_conv is not None else None
    if relu is None:
        raise BackendError("export: no Convolution followed by a Relu (the stem) in the traced graph")
    marked, todo, seen = [], [relu], set()
    while todo:
        node = todo.pop()
        if node.get_name() in seen:
            continue
        seen.add(node.get_name())
        node.get_rt_info()["precise_0"] = ""
        marked.append(node.get_type_name())
        todo.extend(i.get_source_output().get_node() for i in node.inputs())
    if marked.count("Convolution") != 1:
        raise BackendError(f"export: the stem should hold one Convolution, found {marked.count('Convolution')}")
    return marked


def _fresh_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An unfused, contiguous, fp32 copy with the same weights (the running model may be fused,
    channels-last and wrapped for autocast; the exporter sees plain ops)."""
    import copy
    fresh = copy.deepcopy(model).float().eval()
    for module in fresh.modules():
        module.__dict__.pop("forward", None)  # embedder.keep_feature_convs_fp32's wrappers
        for attr in ("_speakerlab_fuse", "_speakerlab_folded", "_speakerlab_keep_fp32"):
            module.__dict__.pop(attr, None)
    return fresh.to(memory_format=torch.contiguous_format)


def export_openvino(model: torch.nn.Module, path: Path) -> None:
    """Trace the model on a padded example batch, mark its stem precise and save OpenVINO IR at
    ``path`` (.xml)."""
    ov = _import_openvino()
    fresh = _fresh_copy(model)
    feat_dim = int(getattr(fresh, "feat_dim", 80))
    frames = 437  # two segments and a partial third for CAM++; odd, so every stride rounds
    with torch.no_grad():
        feats = torch.randn(2, frames, feat_dim, generator=torch.Generator().manual_seed(0))
        lengths = torch.tensor([frames, 300])
        with warnings.catch_warnings():  # the tracer's notes on shape arithmetic: handled in the models
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(_Traced(fresh), (feats, lengths), check_trace=False)
            converted = convert_model(traced, example_input=(feats, lengths), input=[
                (ov.PartialShape([-1, -1, feat_dim]), ov.Type.f32), (ov.PartialShape([-1]), ov.Type.i64)])
    mark_stem_precise(converted)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        staged = Path(tmp) / path.name
        ov.save_model(converted, str(staged), compress_to_fp16=False)
        os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(staged, path)  # the .xml last: its presence means the pair is complete


def export_path(model: torch.nn.Module, digest: Optional[str] = None) -> Path:
    from speakerlab.zoo import cache_dir
    key = hashlib.sha1(f"{digest or model_digest(model)}|torch {torch.__version__}|openvino {openvino_version()}"
                       f"|export {EXPORT_VERSION}".encode()).hexdigest()[:20]
    return cache_dir() / "openvino" / key / "model.xml"


class OpenVINOModel:
    """The model (fbank in, embedding out) compiled by OpenVINO for ``precision`` (fp32 | bf16).

    ``streams`` threads may call it at once (the pipeline's model streams): each calling thread gets
    its own infer request, and the compiled model has that many streams of ``threads`` threads.
    """

    def __init__(self, model: torch.nn.Module, precision: str, streams: int = 1, threads: int = 1,
                 digest: Optional[str] = None, defer: bool = False):
        """``defer``: export now (if not cached) but compile on ``compile()`` or first use -- the
        pipeline starts its decode workers first, so they decode while this compiles."""
        if precision not in PRECISIONS:
            raise BackendError(f"openvino backend runs fp32 or bf16, not {precision}")
        if openvino_version() is None:
            raise BackendError("the openvino backend needs OpenVINO: pip install .[openvino] (or openvino)")
        path = export_path(model, digest)
        if not path.is_file():
            log.info("exporting the model to OpenVINO (once per model and version): %s", path.parent)
            export_openvino(model, path)
        self.precision = precision
        self.path = path
        self.feat_dim = int(getattr(model, "feat_dim", 80))
        self.config = {
            "CACHE_DIR": str(path.parent / "compiled"),  # compiled blobs: faster start-up
            # explicit both ways: OpenVINO's CPU default is bf16 where the CPU has it
            "INFERENCE_PRECISION_HINT": PRECISIONS[precision],
            "NUM_STREAMS": max(1, streams),
            "INFERENCE_NUM_THREADS": max(1, streams) * max(1, threads),
            "PERFORMANCE_HINT": "LATENCY" if streams <= 1 else "THROUGHPUT",
            # OpenVINO pins its stream threads to cores by default; here they share the cores with the
            # calling thread, decode workers, other ranks (each pinning on its own) and other jobs, and
            # a pinned thread cannot leave a busy core: measured on 2 cores, one of two engines ran
            # 1.5x slower for a whole calibration (and auto then chose it wrong 2 times in 3); unpinned,
            # the same probes repeat within 3%.
            "ENABLE_CPU_PINNING": False,
        }
        self.compiled = None
        # One infer request per calling thread, held here (not in thread-local storage, which a
        # finished thread would tear down apart from the compiled model they belong to).
        self._requests = {}
        self._lock = threading.Lock()
        if not defer:
            self.compile()

    def compile(self) -> None:
        """Compile (from OpenVINO's blob cache after the first time) and run one small inference, so
        the process's first inference -- which must run alone, see ``openvino_core`` -- is done before
        model streams call in. Idempotent and thread-safe."""
        with self._lock:
            if self.compiled is not None:
                return
            self.compiled = openvino_core().compile_model(str(self.path), "CPU", self.config)
        frames = 200
        self(torch.randn(1, frames, self.feat_dim, generator=torch.Generator().manual_seed(0)), torch.tensor([frames]))

    def _request(self):
        ident = threading.get_ident()
        request = self._requests.get(ident)
        if request is None:
            if self.compiled is None:
                self.compile()
            with self._lock:
                request = self._requests[ident] = self.compiled.create_infer_request()
        return request

    def close(self) -> None:
        """Requests before the compiled model they came from."""
        self._requests.clear()
        self.compiled = None

    def __del__(self):
        self.close()

    def __call__(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, F) fbank and (B,) valid frame counts -> (B, D) fp32 embeddings."""
        request = self._request()
        h = feats.detach().float().contiguous().cpu().numpy()
        lengths = lengths.detach().to(torch.int64).cpu().numpy()
        if not _primed.is_set():  # the process's first inference runs alone (see openvino_core)
            with _core_lock:
                out = request.infer([h, lengths], share_inputs=True)[0]
                _primed.set()
        else:
            out = request.infer([h, lengths], share_inputs=True)[0]
        return torch.from_numpy(np.array(out, dtype=np.float32))
