"""Configs are untrusted input: YAML bombs and oversized files are refused at once, every value the
models and features use is checked, and each problem is one line naming the file, the key and why."""
import os
import time
import tracemalloc
from pathlib import Path

import pytest

from speakerlab.config import MAX_CONFIG_BYTES, ConfigError, load_config
from tests.helpers import ROOT, micro_model, run_cli, tone, write_wav, extract_cmd

GOOD = """sample_rate: 16000
fbank_dim: 8
embedding_size: 16
embedding_model:
  obj: speakerlab.models.eres2net.ERes2NetV2.ERes2NetV2
  args:
    feat_dim: <fbank_dim>
    embedding_size: <embedding_size>
    m_channels: 4
    num_blocks: [1, 1, 1, 1]
"""


def billion_laughs() -> str:
    """The classic alias bomb: 9 levels of 9 aliases, about 600 bytes naming 9**9 strings."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def refused(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_alias_bomb_fails_fast_in_little_memory(tmp_path):
    bomb = write(tmp_path / "bomb.yaml", billion_laughs())
    assert len(bomb.read_bytes()) < 700
    tracemalloc.start()
    started = time.perf_counter()
    message = refused(bomb)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "anchors and aliases" in message and "line 1" in message
    assert elapsed < 1.0 and peak < 5 << 20, (elapsed, peak)


def test_anchors_without_bomb_and_merge_keys_are_refused(tmp_path):
    assert "anchors and aliases" in refused(write(tmp_path / "a.yaml", "x: &x 1\n" + GOOD))
    assert "anchors and aliases" in refused(write(tmp_path / "m.yaml", GOOD + "base: &b {k: 1}\nother: {<<: *b}\n"))


def test_reference_bomb_is_capped(tmp_path):
    """<references> could expand the same way as aliases; their expansion is counted and capped."""
    lines = [GOOD, 'r0: ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"r{i}: [" + ", ".join([f"<r{i - 1}>"] * 10) + "]" for i in range(1, 10)]
    started = time.perf_counter()
    assert "values once <references> are expanded" in refused(write(tmp_path / "refs.yaml", "\n".join(lines) + "\n"))
    assert time.perf_counter() - started < 2.0


def test_too_many_values_fail_fast(tmp_path):
    many = write(tmp_path / "many.yaml", GOOD + "".join(f"k{i}: [1, 2, 3, 4, 5]\n" for i in range(30000)))
    assert len(many.read_bytes()) < MAX_CONFIG_BYTES
    started = time.perf_counter()
    assert "more than 20000 values" in refused(many)
    assert time.perf_counter() - started < 2.0


def test_oversized_and_deeply_nested_files(tmp_path):
    big = write(tmp_path / "big.yaml", GOOD + "# " + "x" * MAX_CONFIG_BYTES + "\n")
    assert "byte limit" in refused(big)
    deep = write(tmp_path / "deep.yaml", "x: " + "[" * 200 + "]" * 200 + "\n" + GOOD)
    assert "nested more than 50 levels deep" in refused(deep)
    deeper = write(tmp_path / "deeper.yaml", "x: " + "[" * 400000 + "]" * 400000 + "\n" + GOOD)
    message = refused(deeper)  # libyaml stops at its own limit first
    assert "nested more than 50" in message or "nesting depth" in message
    assert "not a regular file" in refused(Path("/dev/zero"))
    os.mkfifo(tmp_path / "fifo.yaml")
    assert "not a regular file" in refused(tmp_path / "fifo.yaml")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"sample_rate: \xff\xfe\n")
    assert "not UTF-8" in refused(binary)


@pytest.mark.parametrize("line, key, words", [
    ("sample_rate: abc", "sample_rate", "must be an integer from 4000 to 384000, got 'abc' (a string)"),
    ("sample_rate: -16000", "sample_rate", "-16000 is out of range (4000 to 384000)"),
    ("sample_rate: 1", "sample_rate", "1 is out of range"),
    ("sample_rate: 16000.5", "sample_rate", "a number with a fraction"),
    ("sample_rate: true", "sample_rate", "a boolean"),
    ("sample_rate:", "sample_rate", "empty"),
    ("embedding_size: 1e12", "embedding_size", "got '1e12' (a string)"),
    ("embedding_size: 1.0e+12", "embedding_size", "a number with a fraction"),
    ("embedding_size: 1000000000000", "embedding_size", "out of range (1 to 4096)"),
    ("embedding_size: 0", "embedding_size", "0 is out of range"),
    ("fbank_dim: 12", "fbank_dim", "not a multiple of 8"),
    ("fbank_dim: 4096", "fbank_dim", "out of range (8 to 256)"),
])
def test_bad_top_level_values(tmp_path, line, key, words):
    key_name = line.split(":")[0]
    text = "\n".join(line if l.startswith(key_name + ":") else l for l in GOOD.splitlines()) + "\n"
    message = refused(write(tmp_path / "c.yaml", text))
    assert f"c.yaml: {key}: " in message, message
    assert words in message, message


@pytest.mark.parametrize("arg, value, words", [
    ("m_channels", "-1", "out of range (1 to 512)"),
    ("m_channels", "'32'", "must be an integer"),
    ("num_blocks", "[1, 1, 1]", "must be a list of 4 integers"),
    ("num_blocks", "[1, 1, 1, 100000]", "num_blocks[3]: 100000 is out of range"),
    ("scale", "0", "out of range (1 to 16)"),
    ("pooling_func", "7", "must be a string"),
    ("two_emb_layer", "maybe", "must be true or false"),
    ("block", "os.system", "takes a Python class"),
])
def test_bad_model_args(tmp_path, arg, value, words):
    message = refused(write(tmp_path / "c.yaml", GOOD + f"    {arg}: {value}\n"))
    assert f"c.yaml: embedding_model.args.{arg}" in message and words in message, message


def test_every_shipped_config_passes(fixtures_dir):
    paths = sorted((ROOT / "conf").glob("*.yaml")) + sorted(Path(fixtures_dir).glob("*/config.yaml"))
    assert len(paths) >= 8
    for path in paths:
        config = load_config(path)
        assert config.sample_rate == 16000 and config.fbank_dim == 80


def test_a_value_the_class_refuses_or_a_zero_width_layer_is_one_line(tmp_path):
    from speakerlab.models import ModelLoadError, build_model
    with pytest.raises(ModelLoadError, match="bad args .*unknown pooling_func 'XYZ'"):
        build_model(load_config(write(tmp_path / "p.yaml", GOOD + "    pooling_func: XYZ\n")))
    with pytest.raises(ModelLoadError, match="a layer without channels"):
        build_model(load_config(write(tmp_path / "w.yaml", GOOD.replace("m_channels: 4", "m_channels: 1"))))


@pytest.mark.parametrize("text", [billion_laughs(), GOOD.replace("16000", "abc"), GOOD.replace("16000", "-16000"),
                                  GOOD.replace("embedding_size: 16", "embedding_size: 1e12")])
def test_cli_exits_2_with_one_line(tmp_path, capsys, monkeypatch, text):
    from speakerlab.extract import main
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    model = micro_model(tmp_path / "m")
    write_wav(tmp_path / "data" / "ds" / "spk" / "u.wav", tone(0.5))
    write(tmp_path / "bad.yaml", text)
    argv = extract_cmd(tmp_path / "data", tmp_path / "out", "--model_path", model[1], "--config_file",
                       tmp_path / "bad.yaml")[2:]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "bad.yaml" in errors[0] and "Traceback" not in err, err


def test_cli_subprocess_bomb(tmp_path):
    model = micro_model(tmp_path / "m")
    write_wav(tmp_path / "data" / "ds" / "spk" / "u.wav", tone(0.5))
    write(tmp_path / "bomb.yaml", billion_laughs())
    r = run_cli(extract_cmd(tmp_path / "data", tmp_path / "out", "--model_path", model[1], "--config_file",
                            tmp_path / "bomb.yaml"), timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, \
        r.stderr[-2000:]
