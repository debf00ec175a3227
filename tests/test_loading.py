"""Untrusted checkpoints and configs, and bad command lines: clear errors, no code run, exit 2."""
import os
import pickle
import sys

import pytest
import torch
import yaml

from speakerlab.config import ConfigError, config_from_dict, load_config
from speakerlab.models import ModelLoadError, build_model, load_model, read_state_dict
from tests.helpers import MICRO_ARGS, extract_cmd, micro_model, run_cli, tone, write_wav

V2 = "speakerlab.models.eres2net.ERes2NetV2.ERes2NetV2"


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    folder = tmp_path_factory.mktemp("micro")
    micro_model(folder)
    config = load_config(folder / "config.yaml")
    state = torch.load(folder / "model.ckpt", weights_only=True)
    return folder, config, state


def save(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def outputs(model):
    torch.manual_seed(0)
    x = torch.randn(2, 120, 8)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module", "state_dict+module"])
def test_wrapped_checkpoints_load(micro, tmp_path, wrap):
    folder, config, state = micro
    obj = state
    if "module" in wrap:
        obj = {"module." + k: v for k, v in obj.items()}
    if wrap.startswith("state_dict"):
        obj = {"state_dict": obj, "epoch": 3}
    elif wrap == "model":
        obj = {"model": obj}
    path = save(tmp_path, "wrapped.ckpt", obj)
    got = read_state_dict(path)
    assert list(got) == list(state) and all(torch.equal(got[k], state[k]) for k in state)
    model = load_model(config, path)  # strict: every parameter and buffer matched
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_missing_unexpected_and_shape_mismatch_are_listed(micro, tmp_path):
    folder, config, state = micro
    broken = dict(state)
    dropped = sorted(broken)[0]
    del broken[dropped]
    broken["extra.weight"] = torch.zeros(3)
    name = next(k for k in sorted(broken) if k.endswith("weight") and broken[k].dim() > 1)
    broken[name] = torch.zeros(*broken[name].shape[:-1], broken[name].shape[-1] + 1)
    with pytest.raises(ModelLoadError) as info:
        load_model(config, save(tmp_path, "broken.ckpt", broken))
    text = str(info.value)
    assert str(config.source) in text and "does not match config" in text
    assert f"missing keys (1): {dropped}" in text
    assert "unexpected keys (1): extra.weight" in text
    assert f"shape mismatches (1): {name}: checkpoint" in text


def test_wrong_embedding_size_in_config(micro, tmp_path):
    folder, _, _ = micro
    raw = yaml.safe_load((folder / "config.yaml").read_text())
    raw["embedding_model"]["args"]["embedding_size"] = 32
    other = config_from_dict(raw, source="other.yaml")
    with pytest.raises(ModelLoadError, match=r"does not match config other\.yaml.*\n.*shape mismatches"):
        load_model(other, folder / "model.ckpt")


class Payload:
    """Unpickling this runs a command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_pickle_is_refused_not_run(micro, tmp_path):
    _, config, state = micro
    marker = tmp_path / "ran"
    path = save(tmp_path, "evil.ckpt", {"state_dict": state, "hook": Payload(marker)})
    with pytest.raises(ModelLoadError, match=r"loading it needs \S*system, i.e. arbitrary unpickling"):
        read_state_dict(path)
    assert not marker.exists()
    # a plain pickle (not a torch file) is not executed either
    with open(tmp_path / "plain.pkl", "wb") as handle:
        pickle.dump(Payload(marker), handle)
    with pytest.raises(ModelLoadError):
        read_state_dict(tmp_path / "plain.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("content, words", [
    (b"", "cannot read checkpoint"),
    (b"garbage" * 100, "cannot read checkpoint"),
])
def test_unreadable_checkpoint(tmp_path, content, words):
    (tmp_path / "bad.ckpt").write_bytes(content)
    with pytest.raises(ModelLoadError, match=words):
        read_state_dict(tmp_path / "bad.ckpt")


def test_not_a_state_dict(tmp_path):
    with pytest.raises(ModelLoadError, match="no state_dict of tensors"):
        read_state_dict(save(tmp_path, "list.ckpt", [torch.zeros(2)]))
    with pytest.raises(ModelLoadError, match="not found"):
        read_state_dict(tmp_path / "absent.ckpt")


@pytest.mark.parametrize("obj", ["os.system", "subprocess.Popen", "tests.helpers.Evil", "builtins.eval"])
def test_unknown_obj_is_refused_without_import(obj):
    before = set(sys.modules)
    with pytest.raises(ModelLoadError, match="unknown model obj"):
        build_model(config_from_dict({"embedding_model": {"obj": obj, "args": {}}}))
    assert set(sys.modules) == before


def test_references_resolve():
    raw = {"sample_rate": 16000, "fbank_dim": 8, "embedding_size": "<emb>", "emb": 16, "channels": 4,
           "embedding_model": {"obj": V2, "args": {"feat_dim": "<fbank_dim>", "embedding_size": "<embedding_size>",
                                                   "m_channels": "<channels>", "num_blocks": [1, 1, 1, 1]}}}
    config = config_from_dict(raw)
    assert config.args == MICRO_ARGS
    assert config.embedding_size == 16 and config.fbank_dim == 8
    assert outputs(build_model(config).eval()).shape == (2, 16)


@pytest.mark.parametrize("raw, words", [
    ({"a": "<b>", "b": "<a>", "embedding_model": {"obj": V2, "args": {"x": "<a>"}}}, "circular reference"),
    ({"embedding_model": {"obj": V2, "args": {"x": "<nope>"}}}, "names no top-level key"),
    ({"embedding_model": {"args": {}}}, "needs 'embedding_model"),
    (["not", "a", "mapping"], "expected a mapping"),
    ({"fbank_dim": 80, "embedding_model": {"obj": V2, "args": {"feat_dim": 64}}}, "fbank_dim 80 != "),
])
def test_bad_configs(raw, words):
    with pytest.raises(ConfigError, match=words):
        config_from_dict(raw)


def test_bad_yaml_file(tmp_path):
    (tmp_path / "c.yaml").write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")


# --- command lines: one "error:" line, exit status 2, never a traceback ----------------------
@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory, micro):
    base = tmp_path_factory.mktemp("cli")
    write_wav(base / "data" / "ds" / "spk" / "u.wav", tone(0.5))
    (base / "empty").mkdir()
    (base / "no_audio" / "ds" / "spk").mkdir(parents=True)
    (base / "no_audio" / "ds" / "spk" / "notes.txt").write_text("x")
    folder = micro[0]
    raw = yaml.safe_load((folder / "config.yaml").read_text())
    raw["embedding_model"]["args"]["embedding_size"] = 32
    (base / "wrong_size.yaml").write_text(yaml.safe_dump(raw))
    raw["embedding_model"]["obj"] = "os.system"
    (base / "evil_obj.yaml").write_text(yaml.safe_dump(raw))
    torch.save({"state_dict": micro[2], "hook": Payload(base / "ran")}, base / "evil.ckpt")
    return base, folder


def run_main(argv, capsys):
    from speakerlab.extract import main
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


CASES = {
    "missing data_root": (lambda b, m: ["--data_root", b / "absent", "--model_path", m / "model.ckpt",
                                        "--config_file", m / "config.yaml"], "is not a directory"),
    "empty tree": (lambda b, m: ["--data_root", b / "empty", "--model_path", m / "model.ckpt",
                                 "--config_file", m / "config.yaml"], "no audio files found"),
    "tree without audio": (lambda b, m: ["--data_root", b / "no_audio", "--model_path", m / "model.ckpt",
                                         "--config_file", m / "config.yaml"], "no audio files found"),
    "missing checkpoint": (lambda b, m: ["--data_root", b / "data", "--model_path", b / "absent.ckpt",
                                         "--config_file", m / "config.yaml"], "checkpoint not found"),
    "missing config": (lambda b, m: ["--data_root", b / "data", "--model_path", m / "model.ckpt",
                                     "--config_file", b / "absent.yaml"], "cannot read config"),
    "checkpoint without config": (lambda b, m: ["--data_root", b / "data", "--model_path", m / "model.ckpt"],
                                  "--model_path needs --config_file"),
    "config does not match checkpoint": (lambda b, m: ["--data_root", b / "data", "--model_path", m / "model.ckpt",
                                                       "--config_file", b / "wrong_size.yaml"],
                                         "does not match config"),
    "unknown obj": (lambda b, m: ["--data_root", b / "data", "--model_path", m / "model.ckpt",
                                  "--config_file", b / "evil_obj.yaml"], "unknown model obj 'os.system'"),
    "unsafe checkpoint": (lambda b, m: ["--data_root", b / "data", "--model_path", b / "evil.ckpt",
                                        "--config_file", m / "config.yaml"], "arbitrary unpickling"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_arguments_exit_2(cli_setup, capsys, case, tmp_path):
    base, model = cli_setup
    make_args, words = CASES[case]
    code, err = run_main(make_args(base, model) + ["--output_dir", tmp_path / "out", "--no_progress"], capsys)
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and words in errors[0], err
    assert not (base / "ran").exists()


def test_bad_arguments_subprocess(cli_setup, tmp_path):
    """The real entry point: one line on stderr, exit status 2."""
    base, model = cli_setup
    r = run_cli(extract_cmd(base / "empty", tmp_path / "out", "--model_path", model / "model.ckpt",
                            "--config_file", model / "config.yaml"))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
