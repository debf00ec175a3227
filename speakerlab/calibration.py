"""``--dtype auto`` / ``--backend auto`` on CPU: chosen by measuring, never by CPU flags alone.

Which is faster depends on the machine, not on what its flags promise: on a Xeon with AVX-512 BF16
but no AMX, bf16 ran CAM++ 1.3x *slower* than fp32 (issue 14), while on an AMD EPYC (Zen 4) with the
same flags bf16 was 1.5x faster; OpenVINO beat torch on both. So the candidates this machine offers
(torch fp32, torch bf16 where oneDNN has native bf16, OpenVINO fp32 / bf16 when installed) each run
the real model on a 1 s speech-like input, interleaved so a burst of other load hits all alike, and
the fastest wins. A candidate whose embedding is not within cosine 0.999 of torch fp32 on that input
is never chosen. The choice is cached per machine (CPU model and flags), model (its weights' digest),
and library versions in ``$SPEAKERLAB_CACHE/calibration/``; measuring the torch candidates takes well
under a second on a quiet machine (ERes2NetV2 about 0.7 s) the first time, nothing afterwards. With
OpenVINO the first time also exports and compiles the model (seconds, once per model and version:
CAM++ 9.6 s under load, mostly ``convert_model``; recorded as ``build_s``). Explicit ``--dtype`` /
``--backend`` values are never overridden.
"""
import hashlib
import json
import logging
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

log = logging.getLogger("speakerlab")

PROBE_SECONDS = 1.0
MIN_COSINE = 0.999  # to torch fp32, for a reduced-precision candidate
MIN_COSINE_FP32 = 0.9999  # for an fp32 one (another engine's fp32 must be fp32's numbers)
ROUNDS = 3
BUDGET_S = 0.25  # stop after 2 rounds when one round costs more than this
CALIBRATION_VERSION = 3  # 3: OpenVINO candidates unpinned


def cpu_identity() -> Dict[str, str]:
    """The CPU's model name and feature flags (Linux /proc/cpuinfo; elsewhere what platform says --
    not on Linux, where platform.processor() runs ``uname -p`` in a subprocess, a fork of this process)."""
    name, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not name:
                name = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = value.strip()
    except OSError:
        pass
    if not name:  # (Linux without a "model name", e.g. aarch64: the machine, not `uname -p`)
        name = platform.machine() if sys.platform.startswith("linux") else platform.processor() or platform.machine()
    return {"model": name, "flags": flags}


def has_amx() -> bool:
    return "amx_bf16" in cpu_identity()["flags"].split()


def candidates(dtype: str, backend: str) -> List[Tuple[str, str]]:
    """(backend, dtype) pairs to choose from on CPU for the requested values ("auto" = any)."""
    from speakerlab.backends import openvino_bf16, openvino_version
    from speakerlab.models.fusion import mkldnn_bf16_supported
    out = []
    if backend in ("auto", "torch"):
        dtypes = ["fp32"] + (["bf16"] if mkldnn_bf16_supported() else []) if dtype == "auto" else [dtype]
        out += [("torch", d) for d in dtypes]
    # OpenVINO too when installed: it is safe in-process since backends.openvino_core (one Core,
    # never freed) and faster than torch on both CPUs measured (README "Throughput")
    if backend in ("auto", "openvino") and openvino_version() is not None:
        dtypes = ["fp32"] + (["bf16"] if openvino_bf16() else []) if dtype == "auto" else [dtype]
        out += [("openvino", d) for d in dtypes if d in ("fp32", "bf16")]
    return out


def probe_wave(seconds: float, rate: int) -> np.ndarray:
    """A voiced, speech-like test signal: a gliding F0 with harmonics, syllable bursts, a little noise."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 * (1 + 0.1 * np.sin(2 * np.pi * 0.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    wave = sum(np.sin(k * phase) / k for k in range(1, 12) if 140 * k < rate / 2.2)
    wave = wave * np.clip(np.sin(2 * np.pi * 4 * t), 0.1, None) + 0.01 * rng.standard_normal(len(t))
    return (0.25 * wave / np.abs(wave).max()).astype(np.float32)


def _cache_file(embedder, options: List[Tuple[str, str]]) -> Path:
    """Not keyed on the thread plan: the pipeline and the Python API then make the same choice (and
    the same numbers); fp32/bf16 and torch/OpenVINO ratios hardly move with the thread count."""
    from speakerlab.backends import EXPORT_VERSION, openvino_version
    from speakerlab.zoo import cache_dir
    key = json.dumps({"cpu": cpu_identity(), "model": embedder.model_digest, "torch": torch.__version__,
                      "openvino": openvino_version(), "candidates": options, "fused": embedder.fused,
                      "version": CALIBRATION_VERSION, "export": EXPORT_VERSION}, sort_keys=True)
    return cache_dir() / "calibration" / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".json")


def _read_cache(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
        return data if {"backend", "dtype"} <= set(data) else None
    except (OSError, ValueError):
        return None


def _write_cache(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache only costs the next run another measurement
        log.warning("cannot cache the calibration in %s: %s", path.parent, exc)


def _engine(embedder, backend: str, dtype: str, streams: int, defer: bool = False):
    """The compiled engine for (backend, dtype), None for torch. ``defer``: the chosen engine of a
    run, compiled at ``Embedder.prepare()`` or first use (measured candidates are compiled at once)."""
    if backend == "torch":
        return None
    from speakerlab.backends import OpenVINOModel
    return OpenVINOModel(embedder.model, dtype, streams=streams, threads=torch.get_num_threads(),
                         digest=embedder.model_digest, defer=defer)


def min_cosine(option: Tuple[str, str]) -> float:
    return MIN_COSINE_FP32 if option[1] == "fp32" else MIN_COSINE


def measure(embedder, options: List[Tuple[str, str]], streams: int) -> Tuple[dict, dict]:
    """Time each (backend, dtype) on the probe; returns ({name: best ms}, {name: cosine to torch fp32})
    and leaves the engines it built on ``embedder._calibration_engines`` and the seconds each took
    to build (an OpenVINO export and compile: once per machine, model and version, then cached) on
    ``embedder._calibration_build_s``."""
    rate = embedder.fbank.config.sample_rate
    wave = torch.from_numpy(probe_wave(PROBE_SECONDS, rate))[None]
    feats, frames = embedder.fbank(wave, torch.tensor([wave.shape[1]]))
    engines, build_s = {}, {}
    for option in list(options):
        started = time.perf_counter()
        try:
            engines[option] = _engine(embedder, *option, streams)
        except Exception as exc:  # an export or compile that fails drops the candidate, not the run
            log.warning("auto: %s/%s unavailable (%s); not a candidate", *option, str(exc).splitlines()[0])
            options.remove(option)
            continue
        if engines[option] is not None:
            build_s["/".join(option)] = round(time.perf_counter() - started, 2)

    def run(option):
        embedder.use_engine(option[0], option[1], engines[option])
        return embedder._forward(feats, frames)[0]

    embedder.use_engine("torch", "fp32")
    reference = embedder._forward(feats, frames)[0]
    cosines = {}
    for option in options:  # warm-up: kernels are built on first use
        out = run(option)
        cosines["/".join(option)] = float(torch.nn.functional.cosine_similarity(out, reference, dim=0))
    timings = {option: [] for option in options}
    for index in range(ROUNDS):
        started = time.perf_counter()
        for option in options:
            t = time.perf_counter()
            run(option)
            timings[option].append(time.perf_counter() - t)
        if index >= 1 and time.perf_counter() - started > BUDGET_S:
            break
    embedder._calibration_engines = engines
    embedder._calibration_build_s = build_s
    return ({"/".join(o): round(1000 * min(v), 2) for o, v in timings.items()}, cosines)


def check_request(dtype: str, backend: str, device: torch.device) -> None:
    """A ``dtype`` / ``backend`` request this machine cannot serve, as ValueError with one line (the
    pipeline asks before its scan, so a wrong choice fails in a second)."""
    from speakerlab.backends import openvino_version
    if device.type != "cpu":
        if backend == "openvino":
            raise ValueError("the openvino backend runs on CPU only; use --backend torch (or auto) on GPU")
        return
    if backend == "openvino" and openvino_version() is None:
        raise ValueError("--backend openvino needs OpenVINO: pip install .[openvino] (or openvino)")
    if backend == "openvino" and dtype not in ("auto", "fp32", "bf16"):
        raise ValueError(f"the openvino backend runs fp32 or bf16, not {dtype}")


def choose_engine(embedder, dtype: str, backend: str, streams: int = 1, gpu_default=None) -> dict:
    """Resolve ``dtype`` / ``backend`` ("auto" or given) for ``embedder``, switch it to the choice and
    return the record of what was chosen and why (metadata.json's "engine"). ``gpu_default(device)``
    gives auto's dtype off CPU (the embedder's rule; passed in, so this module never imports it)."""
    device = embedder.device
    check_request(dtype, backend, device)
    if device.type != "cpu":
        chosen = gpu_default(device) if dtype == "auto" else dtype
        embedder.use_engine("torch", chosen)
        return {"backend": "torch", "dtype": chosen,
                "why": "given" if dtype != "auto" else "GPU default (see README)"}
    options = candidates(dtype, backend)
    record = {"cpu": cpu_identity()["model"], "amx": has_amx(), "candidates": ["/".join(o) for o in options]}
    if len(options) == 1:
        chosen = options[0]
        embedder.use_engine(chosen[0], chosen[1], _engine(embedder, *chosen, streams, defer=True))
        return {"backend": chosen[0], "dtype": chosen[1], "why": "given" if "auto" not in (dtype, backend)
                else "the only candidate on this machine", **record}
    cache = _cache_file(embedder, options)
    cached = _read_cache(cache)
    if cached is not None and (cached["backend"], cached["dtype"]) in options:
        chosen = (cached["backend"], cached["dtype"])
        try:
            embedder.use_engine(chosen[0], chosen[1], _engine(embedder, *chosen, streams, defer=True))
        except Exception as exc:  # e.g. its export is gone and fails to build: measure anew
            log.warning("auto: the cached choice %s/%s did not build (%s); measuring again", *chosen,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            cached = None
        else:
            log.debug("auto: %s/%s, fastest here when measured on %s (%s)", chosen[0], chosen[1],
                     cached.get("measured", "?"), cache)
            return {**cached, "why": f"fastest when measured on {cached.get('measured', '?')} (read from {cache})",
                    **record}
    started = time.perf_counter()
    ms, cosines = measure(embedder, options, streams)
    # (with an explicit reduced dtype no candidate may pass: then the closest one serves)
    safe = [o for o in options if cosines["/".join(o)] >= min_cosine(o)] or [
        max(options, key=lambda o: cosines["/".join(o)])]
    chosen = min(safe, key=lambda o: ms["/".join(o)])
    engine = embedder._calibration_engines[chosen]
    build_s = embedder._calibration_build_s
    del embedder._calibration_engines, embedder._calibration_build_s  # the losers' compiled models go
    embedder.use_engine(chosen[0], chosen[1], engine)
    result = {"backend": chosen[0], "dtype": chosen[1], "probe_ms": ms, "cosine_to_fp32": cosines,
              "probe_s": PROBE_SECONDS, "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "measure_s": round(time.perf_counter() - started, 2), "build_s": build_s}
    _write_cache(cache, result)
    log.debug("auto: %s/%s, fastest of %s on this machine (ms per %.0f s probe: %s)", chosen[0], chosen[1],
             ", ".join(record["candidates"]), PROBE_SECONDS, ms)
    return {**result, "why": f"fastest measured on this machine now (saved in {cache})", **record}
