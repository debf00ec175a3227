"""Model registry: config ``obj`` names map to our classes, never to an import of arbitrary code."""
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from speakerlab.config import ModelConfig


def _campplus():
    from speakerlab.models.campplus import CAMPPlus
    return CAMPPlus


def _eres2net():
    from speakerlab.models.eres2net import ERes2Net
    return ERes2Net


def _eres2net_huge():
    from speakerlab.models.eres2net import ERes2NetHuge
    return ERes2NetHuge


def _eres2netv2():
    from speakerlab.models.eres2netv2 import ERes2NetV2
    return ERes2NetV2


# 3D-Speaker's dotted paths, and the bare class names, are the only accepted ``obj`` values.
MODEL_CLASSES = {
    "speakerlab.models.campplus.DTDNN.CAMPPlus": _campplus,
    "CAMPPlus": _campplus,
    "speakerlab.models.eres2net.ERes2Net.ERes2Net": _eres2net,
    "ERes2Net": _eres2net,
    "speakerlab.models.eres2net.ERes2Net_huge.ERes2Net": _eres2net_huge,
    "ERes2NetHuge": _eres2net_huge,
    "speakerlab.models.eres2net.ERes2NetV2.ERes2NetV2": _eres2netv2,
    "ERes2NetV2": _eres2netv2,
}


class ModelLoadError(RuntimeError):
    pass


def model_class(config: ModelConfig) -> type:
    """The class ``config`` names (nothing is built or loaded)."""
    factory = MODEL_CLASSES.get(config.obj)
    if factory is None:
        known = ", ".join(sorted(k for k in MODEL_CLASSES if "." in k))
        raise ModelLoadError(f"{config.source}: unknown model obj '{config.obj}' (known: {known})")
    return factory()


def build_model(config: ModelConfig) -> torch.nn.Module:
    cls = model_class(config)
    try:
        with warnings.catch_warnings():  # torch's note on zero-size layers; refused just below
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            model = cls(**config.args)
    except (TypeError, ValueError) as exc:  # an unknown argument, or a value the class refuses
        raise ModelLoadError(f"{config.source}: bad args for {config.obj}: {exc}") from None
    empty = next((name for name, p in model.named_parameters() if p.numel() == 0), None)
    if empty is not None:  # e.g. m_channels * baseWidth < 64 leaves the Res2Net blocks 0 channels wide
        raise ModelLoadError(f"{config.source}: args {config.args} give {config.obj} a layer without "
                             f"channels ({empty}); use larger widths")
    return model


def _torch_reason(exc: BaseException) -> str:
    """The informative line of torch.load's long error text."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation",
                                                              "Please file an issue"))]
    return (useful or lines or [type(exc).__name__])[-1]


def check_checkpoint(path) -> None:
    """What can be told of a checkpoint without reading it (a millisecond; ``read_state_dict`` reads it):
    it exists and is a whole torch file -- a zip archive with a pickle inside (torch.save's format; a
    truncated one has no central directory), or a legacy pickle. ModelLoadError if not."""
    import zipfile
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint not found: {path}")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if not any(name.endswith(".pkl") for name in archive.namelist()):
                    raise ValueError("a zip archive without a pickle inside")
            return
        with open(path, "rb") as handle:
            head = handle.read(2)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"cannot read checkpoint {path}: not a PyTorch state_dict file, or damaged ({exc})") from None
    if head[:1] != b"\x80":  # a pickle's protocol opcode (torch's legacy format starts with one too)
        raise ModelLoadError(f"cannot read checkpoint {path}: not a PyTorch state_dict file, or damaged "
                             "(neither a zip archive nor a pickle; a truncated torch.save file looks like this)")


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """Load a checkpoint without executing code; unwrap {state_dict|model: ...} and 'module.'."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols would bury the error line
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for unsafe/broken files
        unsafe = re.search(r"GLOBAL ([\w.]+)|Unsupported global: (?:GLOBAL )?([\w.]+)", str(exc))
        if unsafe:
            raise ModelLoadError(f"refusing checkpoint {path}: loading it needs {unsafe.group(1) or unsafe.group(2)}, "
                                 "i.e. arbitrary unpickling, which could run code. Re-save it as a plain "
                                 "state_dict (torch.save(model.state_dict(), ...)).") from None
        raise ModelLoadError(f"cannot read checkpoint {path}: not a PyTorch state_dict file, or damaged "
                             f"({_torch_reason(exc)})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"checkpoint {path} holds no state_dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_weights(model: torch.nn.Module, state: Dict[str, torch.Tensor], config: ModelConfig,
                 checkpoint: str) -> None:
    """Strict load with an error that says exactly what does not match."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        def listing(name, items):
            more = f" ... (+{len(items) - 8} more)" if len(items) > 8 else ""
            return f"\n  {name} ({len(items)}): " + ", ".join(items[:8]) + more if items else ""
        raise ModelLoadError(
            f"checkpoint {checkpoint} does not match config {config.source} "
            f"({config.obj}, args {config.args}):"
            + listing("missing keys", missing) + listing("unexpected keys", unexpected)
            + listing("shape mismatches", wrong_shape))
    model.load_state_dict(state, strict=True)


def load_model(config: ModelConfig, checkpoint, device: Optional[torch.device] = None) -> torch.nn.Module:
    model = build_model(config)
    load_weights(model, read_state_dict(checkpoint), config, str(checkpoint))
    model.eval()
    if device is not None:
        model.to(device)
    return model
