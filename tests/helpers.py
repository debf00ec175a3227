"""Small builders shared by the tests: audio trees, tiny model setups, CLI runs."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent


def tone(seconds: float, rate: int = 16000, freq: float = 220.0, seed: int = 0, channels: int = 1):
    """A voiced-ish test signal: harmonics plus a little noise (deterministic)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = sum(np.sin(2 * np.pi * freq * k * t + seed) / k for k in range(1, 6))
    wave = 0.2 * wave / np.max(np.abs(wave)) + 0.01 * rng.standard_normal(len(t))
    if channels > 1:
        wave = np.stack([wave * (0.5 + 0.5 * c / channels) for c in range(channels)], axis=1)
    return wave.astype(np.float32)


def write_wav(path: Path, wave, rate: int = 16000, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave, rate, subtype=subtype)
    return path


def run_cli(args, env=None, cwd=ROOT, timeout=600):
    """Run a command with the repo on PYTHONPATH; returns CompletedProcess (text)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run([str(a) for a in args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def extract_cmd(data_root, output_dir, *extra):
    return [sys.executable, ROOT / "extract_speaker_embeddings.py", "--data_root", data_root,
            "--output_dir", output_dir, "--no_progress", *extra]


def merge_cmd(input_dir, output_dir, *extra):
    return [sys.executable, ROOT / "merge_embeddings.py", "--input_dir", input_dir, "--output_dir", output_dir,
            *extra]


def tiny_model_args(fixtures_dir: Path, name: str = "campplus_tiny"):
    return ["--model_path", fixtures_dir / name / "model.ckpt", "--config_file", fixtures_dir / name / "config.yaml"]


MICRO_ARGS = {"feat_dim": 8, "embedding_size": 16, "m_channels": 4, "num_blocks": [1, 1, 1, 1]}


def micro_model(folder: Path, seed: int = 0, obj: str = "speakerlab.models.eres2net.ERes2NetV2.ERes2NetV2",
                **overrides):
    """A random-weight ERes2NetV2 on 8 mel bins, far cheaper than the fixtures' tiny models: real model
    math for pipeline tests that push many files or an hour of audio through. Returns CLI args."""
    import torch
    import yaml
    from speakerlab.config import config_from_dict
    from speakerlab.models import build_model
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args = dict(MICRO_ARGS, **overrides)
    raw = {"sample_rate": 16000, "fbank_dim": args["feat_dim"], "embedding_model": {"obj": obj, "args": args}}
    (folder / "config.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    torch.manual_seed(seed)
    model = build_model(config_from_dict(raw)).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so the network is not near-identity
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1)
    torch.save(model.state_dict(), folder / "model.ckpt")
    return ["--model_path", folder / "model.ckpt", "--config_file", folder / "config.yaml"]


def as_unprivileged():
    """Command prefix that makes file permissions bite even for root (CI containers often run as
    root, who reads mode-000 files): drop the capabilities that override them. [] for other users;
    None when running as root without a working ``setpriv``."""
    if os.geteuid() != 0:
        return []
    import shutil
    prefix = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
              "--bounding-set=-dac_override,-dac_read_search"]
    if shutil.which("setpriv") is None:
        return None
    probe = subprocess.run(prefix + ["true"], capture_output=True)
    return prefix if probe.returncode == 0 else None


def load_final(final_dir):
    """(utterance pickle, speaker pickle, summary.json) of a final output dir."""
    with open(final_dir / "utterance_embeddings.pkl", "rb") as f:
        utts = pickle.load(f)
    with open(final_dir / "speaker_embeddings.pkl", "rb") as f:
        spks = pickle.load(f)
    return utts, spks, json.loads((final_dir / "summary.json").read_text())
