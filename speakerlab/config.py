"""3D-Speaker style YAML configs.

A config looks like::

    sample_rate: 16000
    fbank_dim: 80
    embedding_size: 192
    embedding_model:
      obj: speakerlab.models.eres2net.ERes2NetV2.ERes2NetV2
      args: {feat_dim: <fbank_dim>, embedding_size: <embedding_size>}

``<name>`` strings refer to top-level keys and are resolved (recursively). Only ``embedding_model``,
``sample_rate`` and ``fbank_dim`` matter here; other keys (training settings) are kept and ignored.
"""
import errno
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

import yaml

_REFERENCE = re.compile(r"^<([A-Za-z_][A-Za-z0-9_]*)>$")


class ConfigError(ValueError):
    pass


# The model YAMLs shipped inside the package (conf/ at the top of a checkout links here).
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "conf"


def packaged_configs() -> Dict[str, Path]:
    """{name: path} of the shipped configs, e.g. {"eres2netv2": .../speakerlab/conf/eres2netv2.yaml}."""
    return {path.stem: path for path in sorted(PACKAGED_CONFIGS.glob("*.yaml"))}


def resolve_config_path(path) -> Path:
    """``path`` if it exists; otherwise a known name (``eres2netv2``, ``eres2netv2.yaml`` or
    ``conf/eres2netv2.yaml``, as the README writes it) means the shipped config, from any directory.
    Anything else is returned unchanged, so the error names what the user gave."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    parts = path.parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "conf"):
        name = path.name[:-5] if path.name.endswith(".yaml") else path.name
        known = packaged_configs().get(name)
        if known is not None:
            return known
    return path


@dataclass
class ModelConfig:
    obj: str
    args: Dict[str, Any] = field(default_factory=dict)
    sample_rate: int = 16000
    fbank_dim: int = 80
    source: str = "<dict>"

    @property
    def embedding_size(self) -> Any:
        return self.args.get("embedding_size")

    def to_dict(self) -> Dict[str, Any]:
        return {"obj": self.obj, "args": dict(self.args), "sample_rate": self.sample_rate,
                "fbank_dim": self.fbank_dim}


def _resolve(value: Any, top: Dict[str, Any], seen: tuple = ()) -> Any:
    if isinstance(value, str):
        match = _REFERENCE.match(value.strip())
        if not match:
            return value
        name = match.group(1)
        if name in seen:
            raise ConfigError(f"circular reference <{name}>")
        if name not in top:
            raise ConfigError(f"reference <{name}> names no top-level key")
        return _resolve(top[name], top, seen + (name,))
    if isinstance(value, dict):
        return {k: _resolve(v, top, seen) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, top, seen) for v in value]
    return value


def config_from_dict(raw: Dict[str, Any], source: str = "<dict>") -> ModelConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    resolved = _resolve(raw, raw)
    model = resolved.get("embedding_model")
    if not isinstance(model, dict) or "obj" not in model:
        raise ConfigError(f"{source}: needs 'embedding_model: {{obj: ..., args: {{...}}}}'")
    args = model.get("args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"{source}: embedding_model.args must be a mapping")
    fbank_dim = int(resolved.get("fbank_dim", args.get("feat_dim", 80)))
    if "feat_dim" in args and int(args["feat_dim"]) != fbank_dim:
        raise ConfigError(f"{source}: fbank_dim {fbank_dim} != embedding_model.args.feat_dim {args['feat_dim']}")
    return ModelConfig(obj=str(model["obj"]), args=dict(args),
                       sample_rate=int(resolved.get("sample_rate", 16000)),
                       fbank_dim=fbank_dim, source=source)


def load_config(path) -> ModelConfig:
    """Read a YAML config; a known name that is not a file here (``conf/eres2netv2.yaml``) is the shipped one."""
    path = resolve_config_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        hint = ""
        if exc.errno == errno.ENOENT:
            hint = f" (shipped configs: {', '.join(f'conf/{name}.yaml' for name in packaged_configs())})"
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}{hint}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    return config_from_dict(raw, source=str(path))
