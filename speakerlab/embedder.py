"""Waveforms in, embeddings out: fbank and model on one device, batched, padding-invisible.

Shared by the extraction pipeline and the Python API so both give the same numbers.
"""
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from speakerlab.batching import grid_frames
from speakerlab.config import ModelConfig
from speakerlab.features import Fbank, FbankConfig
from speakerlab.models.fusion import enable_fusion, keep_fp32, mkldnn_bf16_supported

log = logging.getLogger("speakerlab")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    return mkldnn_bf16_supported()


def default_dtype(device: torch.device) -> str:
    """Fastest setting measured to keep cosine >= 0.999 to fp32 on real speech (see README)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
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
        if not torch.is_autocast_enabled(x.device.type):
            return self.forward(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
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
        self.fbank = Fbank(FbankConfig(sample_rate=config.sample_rate,
                                       num_mel_bins=config.fbank_dim)).to(device)
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
        # Pad every batch to a grid length (batching.grid_frames) so shapes repeat; default on CPU,
        # where oneDNN builds kernels per shape (GPU: unmeasured, off).
        self.grid = device.type == "cpu" if grid is None else grid
        from speakerlab.calibration import choose_engine
        self.choice = choose_engine(self, dtype, backend, streams)

    @property
    def model_digest(self) -> str:
        """The weights' digest (speakerlab/backends.py), computed once: the model's key in caches."""
        if getattr(self, "_digest", None) is None:
            from speakerlab.backends import model_digest
            self._digest = model_digest(self.model)
        return self._digest

    def use_engine(self, backend: str, dtype: str, engine=None) -> None:
        """Run as ``backend`` in ``dtype`` from now on (``engine``: the backend's compiled body)."""
        self.backend, self.dtype, self.engine = backend, dtype, engine

    def _autocast(self):
        if self.dtype == "fp32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.dtype])

    @torch.inference_mode()
    def _forward(self, feats: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        if self.grid:
            padded = grid_frames(feats.shape[1])
            if padded > feats.shape[1]:  # zeros beyond every utterance: masked, invisible
                feats = F.pad(feats, (0, 0, 0, padded - feats.shape[1]))
        lengths = None if bool((frames == feats.shape[1]).all()) else frames
        if self.engine is not None:  # the first conv in torch fp32, the rest in the backend
            h = self.model.forward_stem(feats, lengths)
            full = torch.full((feats.shape[0],), feats.shape[1], dtype=torch.long)
            return self.engine(h, full if lengths is None else lengths).float()
        with self._autocast():
            out = self.model(feats, lengths)
        return out.float()

    def _forward_splitting(self, feats: torch.Tensor, frames: torch.Tensor) -> List[Optional[torch.Tensor]]:
        """Forward; on out-of-memory halve the batch and retry, down to one utterance."""
        try:
            return list(self._forward(feats, frames))
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not _is_oom(exc):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if feats.shape[0] == 1:
                log.warning("out of memory on a single utterance of %d frames", int(frames[0]))
                return [None]
            half = feats.shape[0] // 2
            log.warning("out of memory at batch %d x %d frames; retrying as two halves",
                        feats.shape[0], feats.shape[1])
            first = self._forward_splitting(feats[:half, :int(frames[:half].max())], frames[:half])
            second = self._forward_splitting(feats[half:, :int(frames[half:].max())], frames[half:])
            return first + second

    @torch.inference_mode()
    def embed(self, waves: torch.Tensor, lengths: torch.Tensor) -> List[Result]:
        """(B, N) padded float waveforms at the model's rate -> one Result per row."""
        waves = waves.to(self.device, non_blocking=True)
        lengths = lengths.to(self.device)
        feats, frames = self.fbank(waves, lengths)
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
        if normal:
            index = torch.tensor(normal, device=feats.device)
            sub_frames = frames.index_select(0, index)
            sub = feats.index_select(0, index)[:, :int(max(frames_list[r] for r in normal))]
            if self.channels_last:
                sub = sub.contiguous()
            for row, emb in zip(normal, self._forward_splitting(sub, sub_frames)):
                self._store(results[row], emb)
        for row in long:
            self._embed_long(feats[row, :frames_list[row]], results[row])
        return results

    def _embed_long(self, feats: torch.Tensor, result: Result) -> None:
        total = feats.shape[0]
        pieces = -(-total // self.max_chunk_frames)
        bounds = [round(i * total / pieces) for i in range(pieces + 1)]
        weighted = None
        for start, end in zip(bounds[:-1], bounds[1:]):
            chunk = feats[start:end].unsqueeze(0)
            emb = self._forward_splitting(chunk, torch.tensor([end - start], device=feats.device))[0]
            if emb is None:
                result.error = ("model", "out of memory even for one chunk")
                return
            part = emb.double() * (end - start)
            weighted = part if weighted is None else weighted + part
        result.chunks = pieces
        self._store(result, (weighted / total).float())

    @staticmethod
    def _store(result: Result, emb: Optional[torch.Tensor]) -> None:
        if emb is None:
            result.error = ("model", "out of memory at batch size 1")
            return
        array = emb.detach().cpu().numpy().astype(np.float32)
        if not np.isfinite(array).all():
            result.error = ("model", "the model produced a non-finite embedding")
        else:
            result.embedding = array

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


def default_batch_frames(device: torch.device, model: torch.nn.Module) -> int:
    """Padded frames per batch. Measured on CPU (2-core AVX-512 bf16 machine, bf16, bench/):
    CAM++ per single-threaded stream 1500: 72x, 3000: 84x, 6000: 87x, 12000: 71x real time,
    whole pipeline 3000: 119x, 6000: 126x; ERes2NetV2 is fastest at batch size 1 (1500 frames:
    -5%, 3000: -9%), so there every utterance is its own batch."""
    if device.type == "cuda":
        return 120000
    from speakerlab.models.eres2net_blocks import ERes2NetTrunk
    return 1 if isinstance(model, ERes2NetTrunk) else 6000
