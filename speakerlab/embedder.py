"""Waveforms in, embeddings out: fbank and model on one device, batched, padding-invisible.

Shared by the extraction pipeline and the Python API so both give the same numbers.
"""
import gc
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from speakerlab.batching import GRID_STEPS_PER_OCTAVE, grid_frames
from speakerlab.config import ModelConfig
from speakerlab.devices import autocast_enabled, autocast_off, cuda_bf16_is_fast, exact_fp32
from speakerlab.features import Fbank, FbankConfig
from speakerlab.models.fusion import enable_fusion, keep_fp32, mkldnn_bf16_supported

log = logging.getLogger("speakerlab")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    return mkldnn_bf16_supported()


def default_dtype(device: torch.device) -> str:
    """Fastest setting measured to keep cosine >= 0.999 to fp32 on real speech (see README).

    CUDA: bf16 on tensor cores (compute capability >= 8.0). Older GPUs report bf16 as supported but
    emulate it, slower than fp32; V100/T4 (7.x) have fp16 tensor cores, and fp16's 10-bit mantissa is
    finer than bf16's, only its range is smaller: an utterance whose fp16 embedding overflows is redone
    in fp32 (``Pending.results``). Before 7.0 there are no tensor cores: fp32."""
    if device.type == "cuda":
        if cuda_bf16_is_fast(device):
            return "bf16"
        return "fp16" if torch.cuda.get_device_capability(device)[0] >= 7 else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto`` -> the default for ``device``; anything else must name one of ``DTYPES``.
    (On CPU, ``Embedder(dtype="auto")`` measures instead: see ``speakerlab/calibration.py``.)"""
    if dtype == "auto":
        return default_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, not {dtype!r}")
    return dtype


def check_engine_args(dtype: str, backend: str) -> None:
    """Bad ``dtype`` / ``backend`` values, as ValueError with one line."""
    from speakerlab.backends import BACKENDS
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, not {dtype!r}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}, not {backend!r}")


@dataclass
class Result:
    embedding: Optional[np.ndarray] = None
    error: Optional[Tuple[str, str]] = None  # (stage, reason)
    chunks: int = 1


class _Fp32Forward:
    """A module's forward run in fp32 under autocast, its output handed back in ``dtype``."""

    def __init__(self, forward, dtype: torch.dtype):
        self.forward = forward
        self.dtype = dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not autocast_enabled(x.device.type):
            return self.forward(x)
        with autocast_off(x.device.type):
            return self.forward(x.float()).to(self.dtype)


def keep_feature_convs_fp32(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Run the convolutions that read the fbank itself (1 input channel) in fp32.

    Measured on CAM++ (real weights, bench corpus): rounding the first conv's weights and input
    to bf16 is where most of bf16's error comes from -- all-bf16 gave cosine 0.9977 to fp32 on
    one harmonic-tone file (0.99975 on real speech); with this conv in fp32 every file stays
    >= 0.9995, for ~10% of the model's speed on CPU (it is one small conv).
    """
    count = 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)) and module.in_channels == 1:
            module.forward = _Fp32Forward(module.forward, dtype)
            keep_fp32(module)  # the fused path (models/fusion.py) honours it too
            count += 1
    return count


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def release_memory(device: torch.device) -> None:
    """After an out-of-memory error has been handled: collect what its traceback held (reference
    cycles too) and hand the allocator's free blocks back, so a retry starts from a clean slate."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Pending:
    """A batch queued on the device; ``results()`` waits for it and returns one Result per row.

    Its embeddings come back in one copy: on CUDA non-blocking into pinned memory, with an event
    recorded behind it, so the host can store the previous batch while this one runs. ``redo``
    (fp16 only) recomputes one row in fp32 when its fp16 embedding overflowed.
    """

    def __init__(self, results: List[Result], rows: List[int], embeddings: Optional[torch.Tensor],
                 event=None, redo: Optional[Callable[[int], Optional[torch.Tensor]]] = None):
        self._results = results
        self._rows = rows
        self._embeddings = embeddings
        self._event = event
        self._redo = redo

    def results(self) -> List[Result]:
        if self._rows:
            if self._event is not None:
                self._event.synchronize()
            array = self._embeddings.numpy()
            for position, row in enumerate(self._rows):
                emb = np.array(array[position], dtype=np.float32)
                if not np.isfinite(emb).all() and self._redo is not None:
                    redone = self._redo(row)
                    if redone is not None:
                        log.info("an fp16 embedding overflowed; redone in fp32")
                        emb = redone.cpu().numpy().astype(np.float32)
                if np.isfinite(emb).all():
                    self._results[row].embedding = emb
                else:
                    self._results[row].error = ("model", "the model produced a non-finite embedding")
            self._rows, self._embeddings, self._event, self._redo = [], None, None, None
        return self._results


class Embedder:
    """fbank + model on ``device``; ``embed(waves, lengths)`` handles a padded batch.

    Long inputs (more than ``max_chunk_s`` seconds, counted in feature frames of the fbank's shift;
    or ``max_chunk_frames`` frames) are embedded in equal chunks whose
    embeddings are averaged, weighted by chunk length; the features are computed and mean-normalised
    over the whole file first, so every chunk sees the same normalisation. Shorter inputs get
    exactly the reference's whole-utterance embedding.
    """

    def __init__(self, model: torch.nn.Module, config: ModelConfig, device: torch.device,
                 dtype: str = "fp32", channels_last: Optional[bool] = None,
                 max_chunk_frames: int = 30000, fuse: bool = True, grid: Optional[bool] = None,
                 max_chunk_s: Optional[float] = None, backend: str = "torch", streams: int = 1):
        """``dtype`` / ``backend`` "auto": on CPU, the fastest of the candidates this machine offers,
        measured on this model (speakerlab/calibration.py, cached); ``self.choice`` says what and why."""
        check_engine_args(dtype, backend)
        self.device = device
        self.dtype = dtype
        self.backend = "torch"
        self.engine = None  # the exported body (speakerlab/backends.py) when the backend is not torch
        self.model = model.eval().to(device)
        self.fbank = features_for(config).to(device)
        self.min_frames = int(getattr(model, "min_frames", 2))
        if max_chunk_s is not None:
            max_chunk_frames = int(max_chunk_s * self.frames_per_second())
        self.max_chunk_frames = max(self.min_frames, int(max_chunk_frames))
        is_2d = any(isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1) for m in model.modules())
        if channels_last is None:
            channels_last = is_2d
        self.channels_last = channels_last and is_2d
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if dtype != "fp32":  # "auto" may pick bf16 (CPU) / fp16 (GPU)
            keep_feature_convs_fp32(self.model, DTYPES[default_dtype(device) if dtype == "auto" else dtype])
        # conv + BatchNorm + activation as one op (models/fusion.py): the same function, rounded
        # differently -- fp32 within 2e-5 relative of unfused; bf16 as close to fp32 as unfused bf16
        self.fused = fuse
        if fuse:
            enable_fusion(self.model)
        # Pad every batch to a grid length (batching.grid_frames) so shapes repeat: on CPU oneDNN
        # builds kernels per shape (16 steps per octave, <= 6.25% padding, measured); on CUDA each
        # new (B, T) makes cuDNN choose its algorithms again, and padding costs compute in
        # proportion, so a coarser grid (8 steps, <= 12.5%) halves the shapes (unmeasured).
        self.grid, self.grid_steps = length_grid(device, grid)
        # fp32 means fp32 on CUDA (no TF32): the fbank, the conv reading it, and --dtype fp32
        self.exact_fp32 = device.type == "cuda"
        from speakerlab.calibration import choose_engine
        self.choice = choose_engine(self, dtype, backend, streams, gpu_default=default_dtype)

    @property
    def model_digest(self) -> str:
        """The weights' digest (speakerlab/backends.py), computed once: the model's key in caches."""
        if getattr(self, "_digest", None) is None:
            from speakerlab.backends import model_digest
            self._digest = model_digest(self.model)
        return self._digest

    def prepare(self) -> None:
        """Finish what the engine left for later (OpenVINO: compile, one small inference); else it
        happens on the first batch. The pipeline calls this once its decode workers are running."""
        if self.engine is not None and hasattr(self.engine, "compile"):
            self.engine.compile()

    def engine_failure(self, exc: BaseException) -> Exception:
        """What to tell the user when ``prepare()`` raised ``exc``: the engine, its file, what to do."""
        from speakerlab.backends import BackendError
        path = getattr(self.engine, "path", None)
        return BackendError(f"the {self.backend} engine ({self.dtype}) did not compile"
                            + (f" from {path}" if path else "") + f": {exc}; rerun with --backend torch"
                            + (f", or remove {path.parent} to export it again" if path else ""))

    def use_engine(self, backend: str, dtype: str, engine=None) -> None:
        """Run as ``backend`` in ``dtype`` from now on (``engine``: the backend's compiled model)."""
        self.backend, self.dtype, self.engine = backend, dtype, engine

    def _autocast(self, dtype: Optional[str] = None):
        dtype = dtype or self.dtype
        if dtype == "fp32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[dtype])

    @torch.inference_mode()
    def _forward(self, feats: torch.Tensor, frames: torch.Tensor, dtype: Optional[str] = None) -> torch.Tensor:
        """(B, T, F) features on the device and (B,) frame counts on the host -> (B, D) fp32;
        ``dtype`` overrides the embedder's (an fp32 redo)."""
        if self.grid:
            padded = grid_frames(feats.shape[1], self.grid_steps)
            if padded > feats.shape[1]:  # zeros beyond every utterance: masked, invisible
                feats = F.pad(feats, (0, 0, 0, padded - feats.shape[1]))
        lengths = None if bool((frames == feats.shape[1]).all()) else frames  # host: no device sync
        if self.engine is not None and (dtype is None or dtype == self.dtype):
            # the whole model in the backend (its stem in fp32 there, see backends.py)
            full = torch.full((feats.shape[0],), feats.shape[1], dtype=torch.long)
            return self.engine(feats, full if lengths is None else lengths).float()
        with self._autocast(dtype):
            out = self.model(feats, lengths)
        return out.float()

    def _forward_splitting(self, feats: torch.Tensor, frames: torch.Tensor,
                           dtype: Optional[str] = None) -> List[Optional[torch.Tensor]]:
        """Forward; on out-of-memory halve the batch and retry, down to one utterance."""
        try:
            return list(self._forward(feats, frames, dtype))
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not _is_oom(exc):
                raise
        # Out of memory. The retry runs here, after the handler: inside it, the exception's traceback
        # keeps the failed forward's frames -- and so its activations -- alive, empty_cache() frees
        # nothing and each half runs beside them (a real OOM would cascade down to batch 1).
        release_memory(self.device)
        if feats.shape[0] == 1:
            log.warning("out of memory on a single utterance of %d frames", int(frames[0]))
            return [None]
        half = feats.shape[0] // 2
        log.warning("out of memory at batch %d x %d frames; retrying as two halves",
                    feats.shape[0], feats.shape[1])
        first = self._forward_splitting(feats[:half, :int(frames[:half].max())], frames[:half], dtype)
        second = self._forward_splitting(feats[half:, :int(frames[half:].max())], frames[half:], dtype)
        return first + second

    @torch.inference_mode()
    def embed(self, waves: Optional[torch.Tensor], lengths: torch.Tensor,
              feats: Optional[torch.Tensor] = None) -> List[Result]:
        """(B, N) padded float waveforms at the model's rate -> one Result per row. ``feats``: their
        (B, T, F) fbank, already computed (``self.fbank`` of the same waves; ``waves`` may be None)."""
        return self.submit(waves, lengths, feats).results()

    @torch.inference_mode()
    def submit(self, waves: Optional[torch.Tensor], lengths: torch.Tensor,
               feats: Optional[torch.Tensor] = None) -> Pending:
        """Queue a batch on the device and return at once (CUDA): nothing here reads a value back
        from the device -- frame counts come from the host-side ``lengths``, and the embeddings come
        back in one asynchronous copy (``Pending.results()`` waits for it). ``feats`` as in ``embed``."""
        lengths = lengths.cpu()  # (from the loader: already on the host)
        frames = self.fbank.frame_lengths(lengths)
        frames_list = frames.tolist()
        results = [Result() for _ in frames_list]
        normal, long = [], []
        for row, count in enumerate(frames_list):
            if count < self.min_frames:
                seconds = self.min_frames_seconds()
                results[row].error = ("validate", f"too short: {int(lengths[row]) / self.fbank.config.sample_rate:.3f} s "
                                                  f"gives {count} frames; the model needs at least {self.min_frames} "
                                                  f"frames ({seconds:.3f} s)")
            elif count > self.max_chunk_frames:
                long.append(row)
            else:
                normal.append(row)
        rows, outputs = [], []
        with exact_fp32(self.exact_fp32):
            if feats is None:
                feats, _ = self.fbank(waves.to(self.device, non_blocking=True), lengths)
            else:
                feats = feats.to(self.device, non_blocking=True)
            if normal:
                index = torch.tensor(normal)
                sub = feats.index_select(0, index.to(feats.device, non_blocking=True))
                sub = sub[:, :max(frames_list[r] for r in normal)]
                if self.channels_last:
                    sub = sub.contiguous()
                for row, emb in zip(normal, self._forward_splitting(sub, frames.index_select(0, index))):
                    if emb is None:
                        results[row].error = ("model", "out of memory at batch size 1")
                    else:
                        rows.append(row)
                        outputs.append(emb)
            for row in long:
                emb = self._embed_long(feats[row, :frames_list[row]], results[row])
                if emb is not None:
                    rows.append(row)
                    outputs.append(emb)
            if not rows:
                return Pending(results, [], None)
            redo = None
            if self.dtype == "fp16":  # fp16 overflows above 65504: such a row is redone in fp32
                def redo(row: int, feats=feats) -> Optional[torch.Tensor]:
                    return self._redo_fp32(feats[row, :frames_list[row]], results[row])
            del feats
            return Pending(results, rows, *self._copy_back(torch.stack(outputs)), redo=redo)

    @staticmethod
    def _copy_back(embeddings: torch.Tensor):
        """A batch's (K, D) embeddings to the host in one copy: (host tensor, event to wait on or None)."""
        if embeddings.device.type != "cuda":
            return embeddings.cpu(), None
        host = torch.empty(embeddings.shape, dtype=embeddings.dtype, pin_memory=True)
        host.copy_(embeddings, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    @torch.inference_mode()
    def _redo_fp32(self, feats: torch.Tensor, result: Result) -> Optional[torch.Tensor]:
        """One utterance's (T, F) features -> its fp32 embedding, chunked as in the first pass (or None)."""
        with exact_fp32(self.exact_fp32):
            if feats.shape[0] > self.max_chunk_frames:
                return self._embed_long(feats, result, "fp32")
            return self._forward_splitting(feats.unsqueeze(0), torch.tensor([feats.shape[0]]), "fp32")[0]

    def _embed_long(self, feats: torch.Tensor, result: Result, dtype: Optional[str] = None) -> Optional[torch.Tensor]:
        """The length-weighted mean of the chunk embeddings (on the device), or None (result.error set)."""
        total = feats.shape[0]
        pieces = -(-total // self.max_chunk_frames)
        bounds = [round(i * total / pieces) for i in range(pieces + 1)]
        weighted = None
        for start, end in zip(bounds[:-1], bounds[1:]):
            chunk = feats[start:end].unsqueeze(0)
            emb = self._forward_splitting(chunk, torch.tensor([end - start]), dtype)[0]
            if emb is None:
                result.error = ("model", "out of memory even for one chunk")
                return None
            part = emb.double() * (end - start)
            weighted = part if weighted is None else weighted + part
        result.chunks = pieces
        return (weighted / total).float()

    def frames_per_second(self) -> float:
        return self.fbank.config.sample_rate / self.fbank.config.frame_shift

    def batch_frames(self, requested: Optional[int] = None) -> int:
        """The frame budget per batch: ``requested``, else the measured default for this model and device."""
        return requested or default_batch_frames(self.device, self.model)

    def min_frames_seconds(self) -> float:
        cfg = self.fbank.config
        return (cfg.frame_length + (self.min_frames - 1) * cfg.frame_shift) / cfg.sample_rate

    def embed_waves(self, waves: Sequence[np.ndarray]) -> List[Result]:
        from speakerlab.batching import pad_waves
        batch, lengths = pad_waves(waves)
        return self.embed(batch, lengths)


def features_for(config: ModelConfig) -> Fbank:
    """The fbank a model of ``config`` reads (the embedder's, and the decode workers' on CPU)."""
    return Fbank(FbankConfig(sample_rate=config.sample_rate, num_mel_bins=config.fbank_dim))


def length_grid(device: torch.device, grid: Optional[bool] = None) -> Tuple[bool, int]:
    """(pad batches to grid lengths?, grid steps per octave) on ``device``; ``grid`` None: the default."""
    return (device.type in ("cpu", "cuda") if grid is None else grid,
            GRID_STEPS_PER_OCTAVE if device.type == "cpu" else GRID_STEPS_PER_OCTAVE // 2)


def default_batch_frames(device: torch.device, model) -> int:
    """Padded frames per batch. Measured on CPU (2-core AVX-512 bf16 machine, bf16, bench/):
    CAM++ per single-threaded stream 1500: 72x, 3000: 84x, 6000: 87x, 12000: 71x real time,
    whole pipeline 3000: 119x, 6000: 126x; ERes2NetV2 is fastest at batch size 1 (1500 frames:
    -5%, 3000: -9%), so there every utterance is its own batch."""
    if device.type == "cuda":
        return 120000
    from speakerlab.models.eres2net_blocks import ERes2NetTrunk
    cls = model if isinstance(model, type) else type(model)  # the model, or its class (not yet built)
    return 1 if issubclass(cls, ERes2NetTrunk) else 6000
