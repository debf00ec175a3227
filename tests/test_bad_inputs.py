"""A tree full of broken and unusual files: the run finishes and accounts for every input.

One extraction + merge over the whole tree (micro model, so the one-hour file stays cheap); the tests
read its results. Decisions checked here (README "Bad input"): truncated data is embedded (what is
there), all-zero / NaN / too-short audio fails with the reason, a directory that cannot be listed and
a non-UTF-8 name are reported as ``stage: scan`` records in failures.json.
"""
import json
import os
import pickle
import sys

import numpy as np
import pytest
import soundfile as sf

from tests.helpers import as_unprivileged, extract_cmd, merge_cmd, micro_model, run_cli, tone, write_wav

HOUR_S = 3600

# key -> (stage, words the reason must contain)
EXPECTED_FAILURES = {
    "bad_spk1_empty": ("decode", "empty file (0 bytes)"),
    "bad_spk1_trunc_header": ("decode", "not a readable audio file"),
    "bad_spk1_text": ("decode", "not a readable audio file"),
    "bad_spk1_short": ("validate", "too short"),
    "bad_spk1_zeros": ("validate", "all samples are zero"),
    "bad_spk1_nan": ("validate", "NaN or Inf"),
    "bad_spk1_inf": ("validate", "NaN or Inf"),
    "bad_spk1_dc": ("validate", "constant signal: every sample is 0.25"),
    "bad_spk1_tiny": ("validate", "near-silent"),
    "bad_spk1_hz1": ("validate", "implausible sample rate 1 Hz"),
    "fmt_spk2_dangling": ("decode", "file not found"),
    "fmt_spk2_fifo": ("decode", "not a regular file (a named pipe)"),
    "fmt_spk2_unreadable": ("decode", "permission denied"),
}
EXPECTED_EMBEDDED = {
    "bad_spk1_good", "bad_spk1_half_data", "fmt_spk2_ch8", "fmt_spk2_sr8000", "fmt_spk2_sr22050",
    "fmt_spk2_sr44100", "fmt_spk2_sr48000", "fmt_spk2_float32", "fmt_spk2_x", "fmt_spk2_ünï cødé 名前",
    "fmt_spk2_with space", "fmt_spk2_new\nline", "fmt_spk2_..dots..", "fmt_spk2_link_to_flac",
    "fmt_spk3_ok", "long_spk4_hour", "outside_spk5_u",
}


def write_hour(path, seconds=HOUR_S):
    """An hour of low noise written in 10 s blocks: ~1 s and 115 MB, no hour-long array in memory."""
    block = (np.random.default_rng(0).standard_normal(16000 * 10) * 0.05).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with sf.SoundFile(str(path), "w", 16000, 1, subtype="PCM_16") as handle:
        for _ in range(seconds // 10):
            handle.write(block)


def with_rate(wav: bytes, rate: int) -> bytes:
    """A canonical PCM WAV with its header's sample rate (and byte rate) replaced."""
    channels, bits = int.from_bytes(wav[22:24], "little"), int.from_bytes(wav[34:36], "little")
    return (wav[:24] + rate.to_bytes(4, "little") + (rate * channels * bits // 8).to_bytes(4, "little")
            + wav[32:])


def make_bad_tree(root, outside):
    bad = root / "bad" / "spk1"
    good = write_wav(bad / "good.wav", tone(1.0, seed=1))
    raw = good.read_bytes()
    (bad / "empty.wav").write_bytes(b"")
    (bad / "trunc_header.wav").write_bytes(raw[:20])             # stops inside the fmt chunk
    (bad / "half_data.wav").write_bytes(raw[:len(raw) // 2])     # header says 1 s, half is there
    (bad / "text.wav").write_text("this is not audio\n")
    write_wav(bad / "short.wav", tone(0.02, seed=2))              # fewer frames than any model needs
    write_wav(bad / "zeros.wav", np.zeros(16000, np.float32))
    wave = tone(1.0, seed=3)
    wave[500] = np.nan
    write_wav(bad / "nan.wav", wave, subtype="FLOAT")
    wave = tone(1.0, seed=4)
    wave[700] = np.inf
    write_wav(bad / "inf.wav", wave, subtype="FLOAT")
    write_wav(bad / "dc.wav", np.full(16000, 0.25, np.float32))               # a DC offset, no sound
    write_wav(bad / "tiny.wav", tone(1.0, seed=17) * np.float32(1e-38), subtype="FLOAT")  # near-silent
    (bad / "hz1.wav").write_bytes(with_rate(raw, 1))                           # header claims 1 Hz

    fmt = root / "fmt" / "spk2"
    write_wav(fmt / "ch8.wav", tone(1.0, seed=5, channels=8))
    for rate in (8000, 22050, 44100, 48000):
        write_wav(fmt / f"sr{rate}.wav", tone(1.0, rate=rate, seed=6), rate=rate)
    write_wav(fmt / "float32.wav", tone(1.0, seed=7), subtype="FLOAT")
    write_wav(fmt / "x.flac", tone(1.0, seed=8))
    write_wav(fmt / "ünï cødé 名前.wav", tone(1.0, seed=9))
    write_wav(fmt / "with space.wav", tone(1.0, seed=10))
    write_wav(fmt / "new\nline.wav", tone(1.0, seed=11))
    write_wav(fmt / "..dots...wav", tone(1.0, seed=12))
    os.symlink(fmt / "x.flac", fmt / "link_to_flac.flac")
    os.symlink("..", fmt / "loop")                                # a directory loop
    os.symlink(fmt / "missing.wav", fmt / "dangling.wav")
    os.mkfifo(fmt / "fifo.wav")                                   # opening it would block forever
    os.chmod(write_wav(fmt / "unreadable.wav", tone(1.0, seed=13)), 0)
    with open(os.path.join(os.fsencode(fmt), b"latin1_\xe9.wav"), "wb") as handle:
        handle.write(raw)                                         # a name that is not UTF-8

    spk3 = root / "fmt" / "spk3"
    write_wav(spk3 / "ok.wav", tone(1.0, seed=15))
    write_wav(spk3 / "locked" / "hidden.wav", tone(1.0, seed=14))
    os.chmod(spk3 / "locked", 0)                                  # a directory we cannot list

    write_hour(root / "long" / "spk4" / "hour.wav")
    # a symlinked dataset from outside the tree is followed (once, though linked twice)
    write_wav(outside / "spk5" / "u.wav", tone(1.0, seed=16))
    os.symlink(outside, root / "outside")
    os.symlink(outside, root / "bad" / "spk1" / "again")
    return root


def tree_listing(top):
    out = set()
    for dirpath, dirnames, filenames in os.walk(top):
        out.update(os.path.join(dirpath, n) for n in dirnames + filenames)
    return out


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    prefix = as_unprivileged()
    base = tmp_path_factory.mktemp("bad")
    model = micro_model(base / "model")
    root = make_bad_tree(base / "data", base / "outside_data")
    before = tree_listing(base)
    try:
        cmd = extract_cmd(root, base / "tmp", *model, "--dtype", "fp32", "--batch_size", "4")
        extract = run_cli((prefix or []) + cmd, timeout=900)
        merge = run_cli(merge_cmd(base / "tmp", base / "final", "--formats", "pkl,npz,kaldi"))
    finally:
        os.chmod(root / "fmt" / "spk3" / "locked", 0o755)
    return {"base": base, "root": root, "model": model, "extract": extract, "merge": merge,
            "before": before, "privileges_dropped": prefix is not None}


def read_final(final):
    failures = json.loads((final / "failures.json").read_text(encoding="utf-8"))
    summary = json.loads((final / "summary.json").read_text(encoding="utf-8"))
    with open(final / "utterance_embeddings.pkl", "rb") as handle:
        utts = pickle.load(handle)
    return failures, summary, utts


def test_run_finishes_with_warning(bad_run):
    extract, merge = bad_run["extract"], bad_run["merge"]
    assert extract.returncode == 0, extract.stderr[-3000:]
    assert "Traceback" not in extract.stderr
    failed = len(EXPECTED_FAILURES) if bad_run["privileges_dropped"] else len(EXPECTED_FAILURES) - 1
    assigned = failed + len(EXPECTED_EMBEDDED)
    assert f"WARNING rank 0: {failed} of {assigned} files failed" in extract.stderr
    assert merge.returncode == 0, merge.stderr[-3000:]
    assert f"WARNING {failed} input files were not embedded" in merge.stderr


def test_every_input_accounted_for(bad_run):
    failures, summary, utts = read_final(bad_run["base"] / "final")
    by_key = {f["key"]: f for f in failures if f["key"] is not None}
    expected = dict(EXPECTED_FAILURES)
    if not bad_run["privileges_dropped"]:  # root without setpriv reads mode-000 files
        expected.pop("fmt_spk2_unreadable")
    assert set(by_key) == set(expected)
    for key, (stage, words) in expected.items():
        assert by_key[key]["stage"] == stage, by_key[key]
        assert words in by_key[key]["reason"], by_key[key]
        assert by_key[key]["path"].endswith("/" + key.split("_", 2)[2] + ".wav")
    assert set(utts) == EXPECTED_EMBEDDED | ({"fmt_spk2_unreadable"} if not bad_run["privileges_dropped"] else set())
    assert summary["total_utterances"] == len(utts)
    assert summary["failures"] == len(by_key)
    assert summary["total_input_files"] == len(utts) + len(by_key)
    for entry in utts.values():
        assert entry["embedding"].shape == (16,) and np.isfinite(entry["embedding"]).all()


def test_too_short_names_the_minimum(bad_run):
    failures, _, _ = read_final(bad_run["base"] / "final")
    reason = next(f["reason"] for f in failures if f["key"] == "bad_spk1_short")
    assert "0.020 s gives 0 frames" in reason and "needs at least" in reason and "frames (" in reason


def test_scan_problems_are_reported(bad_run):
    failures, summary, _ = read_final(bad_run["base"] / "final")
    scan = [f for f in failures if f["stage"] == "scan"]
    reasons = {os.path.basename(f["path"]): f["reason"] for f in scan}
    assert "not valid UTF-8" in reasons["latin1_\\xe9.wav"]
    if bad_run["privileges_dropped"]:
        assert "cannot list directory" in reasons["locked"]
        assert "scan: " in bad_run["extract"].stderr and "locked: cannot list directory" in bad_run["extract"].stderr
    assert summary["scan_errors"] == len(scan) == len(reasons)
    assert all(f["key"] is None for f in scan)


def test_long_file_is_chunked(bad_run):
    _, _, utts = read_final(bad_run["base"] / "final")
    utt_list = json.loads((bad_run["base"] / "final" / "utterance_list.json").read_text(encoding="utf-8"))
    hour = next(u for u in utt_list if u["key"] == "long_spk4_hour")
    assert hour["duration"] == HOUR_S
    assert hour["chunks"] == 12  # --max_chunk_s 300 by default


def test_formats_resample_and_channels(bad_run):
    """Rates and sample formats only change the decoding: the same tone gives nearly the same vector."""
    _, _, utts = read_final(bad_run["base"] / "final")
    e8 = utts["fmt_spk2_sr8000"]["embedding"]
    for key in ("fmt_spk2_sr22050", "fmt_spk2_sr44100", "fmt_spk2_sr48000"):
        other = utts[key]["embedding"]
        assert e8 @ other / np.linalg.norm(e8) / np.linalg.norm(other) > 0.9
    np.testing.assert_array_equal(utts["fmt_spk2_link_to_flac"]["embedding"], utts["fmt_spk2_x"]["embedding"])


def test_symlinked_directory_walked_once(bad_run):
    """data/outside and data/bad/spk1/again link the same directory: its file is embedded once."""
    _, _, utts = read_final(bad_run["base"] / "final")
    assert [k for k in utts if k.endswith("_u")] == ["outside_spk5_u"]


def test_nothing_written_outside_output_dirs(bad_run):
    base = bad_run["base"]
    new = tree_listing(base) - bad_run["before"]
    outside = [p for p in new if not (p.startswith(str(base / "tmp")) or p.startswith(str(base / "final")))]
    assert outside == []


def test_kaldi_keys_without_whitespace(bad_run):
    summary = json.loads((bad_run["base"] / "final" / "summary.json").read_text(encoding="utf-8"))
    renamed = summary["kaldi_renamed_keys"]
    assert renamed["fmt_spk2_with space"] == "fmt_spk2_with_space"
    assert renamed["fmt_spk2_new\nline"] == "fmt_spk2_new_line"


def test_strict_and_no_op_rerun(bad_run):
    """A finished dir is a no-op on rerun; --strict turns the same failures into exit status 1."""
    base = bad_run["base"]
    stamp = os.stat(base / "tmp" / "rank_00" / "embeddings.npz").st_mtime_ns
    cmd = extract_cmd(bad_run["root"], base / "tmp", *bad_run["model"], "--dtype", "fp32", "--batch_size", "4")
    # the tree as the first run saw it (a rerun checks that no file was added or removed since)
    locked = bad_run["root"] / "fmt" / "spk3" / "locked"
    os.chmod(locked, 0o000)
    try:
        prefix = as_unprivileged() or []
        again = run_cli(prefix + cmd)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "already complete" in again.stderr and "files failed" in again.stderr
        strict = run_cli(prefix + cmd + ["--strict"])
        assert strict.returncode == 1, strict.stderr[-2000:]
    finally:
        os.chmod(locked, 0o755)
    assert os.stat(base / "tmp" / "rank_00" / "embeddings.npz").st_mtime_ns == stamp
    if bad_run["privileges_dropped"]:  # permissions fixed: the hidden file is new to the scan, and said so
        changed = run_cli(cmd)
        assert changed.returncode == 2 and "1 new or moved (e.g. fmt_spk3_locked_hidden)" in changed.stderr


def test_all_failed_is_exit_1(tmp_path):
    root = tmp_path / "data" / "ds" / "spk"
    root.mkdir(parents=True)
    (root / "a.wav").write_text("not audio")
    (root / "b.wav").write_bytes(b"")
    model = micro_model(tmp_path / "model")
    r = run_cli(extract_cmd(tmp_path / "data", tmp_path / "tmp", *model))
    assert r.returncode == 1, r.stderr[-2000:]
    assert "2 of 2 files failed" in r.stderr and "Traceback" not in r.stderr


def test_scan_walks_real_tree_first(tmp_path):
    """A symlink to a directory inside the tree never steals its keys, and loops end."""
    from speakerlab.data import scan_tree
    write_wav(tmp_path / "ds" / "spkA" / "a.wav", tone(0.2))
    os.symlink(tmp_path / "ds" / "spkA", tmp_path / "ds" / "0link")   # sorts before spkA
    os.symlink(tmp_path / "ds", tmp_path / "ds" / "spkA" / "up")
    scan = scan_tree(tmp_path)
    assert [u.key for u in scan.utterances] == ["ds_spkA_a"]
    assert scan.errors == []


@pytest.mark.parametrize("channels", ["first", "mean"])
def test_decode_in_blocks_equals_whole_read(tmp_path, monkeypatch, channels):
    """Block-wise decoding (one channel kept per block) equals reading the file at once."""
    from speakerlab import audio
    path = write_wav(tmp_path / "ds" / "spk" / "c3.wav", tone(2.0, seed=3, channels=3))
    whole, _ = sf.read(str(path), dtype="float32", always_2d=True)
    want = whole.mean(axis=1) if channels == "mean" else whole[:, 0]
    monkeypatch.setattr(audio, "BLOCK_FRAMES", 7001)  # several blocks, the last one partial
    np.testing.assert_allclose(audio.load_audio(str(path), 16000, channels), want, rtol=0, atol=1e-7)
    np.testing.assert_allclose(audio.load_audio(str(path), 16000, channels, 0.5, 1.25), want[8000:20000],
                               rtol=0, atol=1e-7)
    wave = tone(2.0, seed=4, channels=3)
    wave[20000, 2] = np.nan  # in the third block, in a channel that "first" does not use
    write_wav(path, wave, subtype="FLOAT")
    with pytest.raises(audio.AudioError, match=r"1 NaN or Inf sample value\(s\), the first at 1\.250 s"):
        audio.load_audio(str(path), 16000, channels)


def test_key_clash_keeps_first_and_reports_the_other(tmp_path):
    """One utterance in two formats: the first keeps the key. v/1.wav and v_1.wav are two utterances
    whose names join into one key: both are kept, told apart (tests/test_keys.py)."""
    from speakerlab.data import scan_tree
    write_wav(tmp_path / "ds" / "spk" / "u1.flac", tone(0.2))
    write_wav(tmp_path / "ds" / "spk" / "u1.wav", tone(0.2))
    write_wav(tmp_path / "ds" / "spk" / "v" / "1.wav", tone(0.2))
    write_wav(tmp_path / "ds" / "spk" / "v_1.wav", tone(0.2))
    scan = scan_tree(tmp_path)
    assert (scan.utterances[0].key, os.path.basename(scan.utterances[0].path)) == ("ds_spk_u1", "u1.flac")
    assert sorted(os.path.relpath(u.path, tmp_path / "ds" / "spk") for u in scan.utterances) == [
        "u1.flac", "v/1.wav", "v_1.wav"]
    assert all(u.key.startswith("ds_spk_v_1-") for u in scan.utterances[1:])
    assert [os.path.basename(e["path"]) for e in scan.errors] == ["u1.wav"]
    assert all("is taken by" in e["reason"] and e["stage"] == "scan" for e in scan.errors)


def test_model_error_fails_only_its_file(tmp_path, capsys, monkeypatch):
    """An exception inside the model (a driver error, a bug) fails the utterance that causes it; the
    rest of its batch is retried one by one and embedded, and the rank goes on."""
    from speakerlab import embedder as embedder_mod
    from speakerlab.extract import main
    for i in range(5):
        write_wav(tmp_path / "data" / "ds" / "spk" / f"u{i}.wav", tone(0.5 + 0.1 * i, seed=i))
    poisoned = int((0.5 + 0.1 * 2) * 16000)
    original = embedder_mod.Embedder.embed

    def flaky(self, waves, lengths, feats=None):
        if poisoned in lengths.tolist():
            raise RuntimeError("boom")
        return original(self, waves, lengths, feats)

    monkeypatch.setattr(embedder_mod.Embedder, "embed", flaky)
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    model = micro_model(tmp_path / "model")
    code = main([str(a) for a in extract_cmd(tmp_path / "data", tmp_path / "out", *model, "--batch_size", "8")[2:]])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "out" / "rank_00" / "metadata.json").read_text())
    assert meta["counts"] == {"assigned": 5, "embedded": 4, "failed": 1}
    assert meta["failures"][0]["key"] == "ds_spk_u2"
    assert meta["failures"][0]["reason"] == "model error: RuntimeError: boom"


def test_scan_problems_alone_fail_only_with_strict(tmp_path, caplog, monkeypatch):
    from speakerlab.extract import main
    write_wav(tmp_path / "data" / "ds" / "spk" / "good.wav", tone(0.5))
    with open(os.path.join(os.fsencode(tmp_path / "data" / "ds" / "spk"), b"caf\xe9.wav"), "wb") as handle:
        handle.write(b"RIFF")
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    argv = [str(a) for a in extract_cmd(tmp_path / "data", tmp_path / "out", *micro_model(tmp_path / "m"))[2:]]
    assert main(argv) == 0
    assert "not valid UTF-8" in caplog.text
    assert main(argv + ["--strict"]) == 1
