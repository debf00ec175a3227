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

A config is untrusted input: files over ``MAX_CONFIG_BYTES``, YAML anchors/aliases (``&a`` / ``*a``:
600 bytes of them expand into gigabytes) and references that expand past ``MAX_NODES`` values are
refused, and every value the features and models use is checked for type and range (``ARG_RULES``),
each with one line naming the file, the key and the reason.
"""
import errno
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import yaml

_REFERENCE = re.compile(r"^<([A-Za-z_][A-Za-z0-9_]*)>$")


MAX_CONFIG_BYTES = 1 << 20   # the released configs are < 1 KB; 3D-Speaker training configs a few KB
MAX_NODES = 20_000           # values in the file, and after resolving <references>
MAX_DEPTH = 50               # nesting levels

# Values the features and models read, with their accepted type and range (inclusive). Ranges are wide
# enough for any released or plausible model, narrow enough that a typo cannot ask for terabytes.
SAMPLE_RATE = ("int", 4000, 384000)
FBANK_DIM = ("int8", 8, 256)  # a multiple of 8: the models halve the frequency axis three times
ARG_RULES: Dict[str, Tuple] = {
    "feat_dim": FBANK_DIM,
    "embedding_size": ("int", 1, 4096),
    "m_channels": ("int", 1, 512),
    "baseWidth": ("int", 1, 512),
    "scale": ("int", 1, 16),
    "expansion": ("int", 1, 16),
    "num_blocks": ("ints4", 1, 64),          # blocks per stage, four stages
    "growth_rate": ("int", 1, 1024),         # CAM++
    "bn_size": ("int", 1, 64),
    "init_channels": ("int", 1, 4096),
    "pooling_func": ("str",),
    "config_str": ("str",),
    "two_emb_layer": ("bool",),
    "memory_efficient": ("bool",),
}
# constructor arguments that take Python classes: a config cannot give them
CLASS_ARGS = ("block", "block_fuse")


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


class _Budget:
    """Counts the values produced while resolving references, so <a> -> [<b>, <b>] -> ... cannot
    expand exponentially."""

    def __init__(self, source: str):
        self.source, self.left = source, MAX_NODES

    def spend(self, depth: int) -> None:
        self.left -= 1
        if self.left < 0:
            raise ConfigError(f"{self.source}: more than {MAX_NODES} values once <references> are expanded; "
                              "refusing it")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{self.source}: nested more than {MAX_DEPTH} levels deep (through <references>?)")


def _resolve(value: Any, top: Dict[str, Any], seen: tuple = (), budget: Optional[_Budget] = None,
             depth: int = 0) -> Any:
    budget = budget or _Budget("<dict>")
    budget.spend(depth)
    if isinstance(value, str):
        match = _REFERENCE.match(value.strip())
        if not match:
            return value
        name = match.group(1)
        if name in seen:
            raise ConfigError(f"circular reference <{name}>")
        if name not in top:
            raise ConfigError(f"reference <{name}> names no top-level key")
        return _resolve(top[name], top, seen + (name,), budget, depth + 1)
    if isinstance(value, dict):
        return {k: _resolve(v, top, seen, budget, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, top, seen, budget, depth + 1) for v in value]
    return value


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", str: "a string", float: "a number with a fraction", list: "a list",
            dict: "a mapping", type(None): "empty"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{text if len(text) <= 40 else text[:37] + '...'} ({kind})"


def check_value(value: Any, rule: Tuple, where: str) -> None:
    """Raise ConfigError('<where>: <what is wrong>') unless ``value`` fits ``rule``."""
    kind = rule[0]
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string, got {_describe(value)}")
        return
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, got {_describe(value)}")
        return
    low, high = rule[1], rule[2]
    if kind == "ints4":
        if not isinstance(value, (list, tuple)) or len(value) != 4:
            raise ConfigError(f"{where}: must be a list of 4 integers (one per stage), got {_describe(value)}")
        for index, item in enumerate(value):
            check_value(item, ("int", low, high), f"{where}[{index}]")
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: must be an integer from {low} to {high}, got {_describe(value)}")
    if not low <= value <= high:
        raise ConfigError(f"{where}: {value} is out of range ({low} to {high})")
    if kind == "int8" and value % 8:
        raise ConfigError(f"{where}: {value} is not a multiple of 8 (the models halve the frequency axis "
                          "three times)")


def config_from_dict(raw: Dict[str, Any], source: str = "<dict>") -> ModelConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        resolved = _resolve(raw, raw, budget=_Budget(source))
    except ConfigError as exc:
        text = str(exc)
        raise ConfigError(text if text.startswith(source) else f"{source}: {text}") from None
    model = resolved.get("embedding_model")
    if not isinstance(model, dict) or "obj" not in model:
        raise ConfigError(f"{source}: needs 'embedding_model: {{obj: ..., args: {{...}}}}'")
    if not isinstance(model["obj"], str):
        raise ConfigError(f"{source}: embedding_model.obj: must be a model name, got {_describe(model['obj'])}")
    args = model.get("args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"{source}: embedding_model.args must be a mapping")
    # top-level keys first: a <reference> gives an arg its value, the message names the key written
    sample_rate = resolved.get("sample_rate", 16000)
    check_value(sample_rate, SAMPLE_RATE, f"{source}: sample_rate")
    fbank_dim = resolved.get("fbank_dim", args.get("feat_dim", 80))
    check_value(fbank_dim, FBANK_DIM, f"{source}: " + ("fbank_dim" if "fbank_dim" in resolved
                                                         else "embedding_model.args.feat_dim"))
    if "embedding_size" in resolved:
        check_value(resolved["embedding_size"], ARG_RULES["embedding_size"], f"{source}: embedding_size")
    for name, value in args.items():
        where = f"{source}: embedding_model.args.{name}"
        if name in CLASS_ARGS:
            raise ConfigError(f"{where}: takes a Python class and cannot be set in a config")
        if name in ARG_RULES:
            check_value(value, ARG_RULES[name], where)
    if "feat_dim" in args and args["feat_dim"] != fbank_dim:
        raise ConfigError(f"{source}: fbank_dim {fbank_dim} != embedding_model.args.feat_dim {args['feat_dim']}")
    return ModelConfig(obj=model["obj"], args=dict(args), sample_rate=sample_rate, fbank_dim=fbank_dim,
                       source=source)


# libyaml when present: 1 MiB of YAML parses in well under a second (the pure-Python parser takes 20 s)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_events(text: str) -> None:
    """Refuse, from the parser's event stream and before anything is built, YAML anchors and aliases
    (``&a [...]`` / ``*a`` let 600 bytes name billions of values: the "billion laughs"; no model
    config needs them), more than MAX_NODES values and nesting deeper than MAX_DEPTH."""
    nodes = depth = 0
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise ConfigError(f"line {event.start_mark.line + 1}: YAML anchors and aliases (&name / *name) are "
                              "not supported in configs; write the values out")
        if isinstance(event, (yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            nodes += 1
            if nodes > MAX_NODES:
                raise ConfigError(f"more than {MAX_NODES} values; a model config has a few dozen")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(f"line {event.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def load_config(path) -> ModelConfig:
    """Read a YAML config; a known name that is not a file here (``conf/eres2netv2.yaml``) is the shipped one."""
    path = resolve_config_path(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block, /dev/zero never ends
            raise ConfigError(f"config {path} is not a regular file")
        size = info.st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config {path} is {size} bytes, over the {MAX_CONFIG_BYTES} byte limit for a "
                              "model config")
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
        text = data.decode("utf-8")
    except OSError as exc:
        hint = ""
        if exc.errno == errno.ENOENT:
            hint = f" (shipped configs: {', '.join(f'conf/{name}.yaml' for name in packaged_configs())})"
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}{hint}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if len(data) > MAX_CONFIG_BYTES:  # grew while being read, or not a regular file
        raise ConfigError(f"config {path} is over the {MAX_CONFIG_BYTES} byte limit for a model config")
    try:
        _check_events(text)
        raw = yaml.load(text, Loader=_LOADER)
    except ConfigError as exc:
        raise ConfigError(f"config {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"config {path} is nested too deeply") from None
    return config_from_dict(raw, source=str(path))
