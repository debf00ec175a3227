"""Hostile-user cases found in review (issues 11, 13, 15): each reproduces a break seen with the real
commands, on tiny trees."""
import json

import numpy as np
import sys
from pathlib import Path

import pytest

import speakerlab
from speakerlab import finaldir
from tests.helpers import ROOT, extract_cmd, merge_cmd, micro_model, run_cli
from tests.test_dirs import make_tree


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return micro_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def merged(tmp_path_factory, model):
    """(run dir, final dir) of one extraction and its merge."""
    base = tmp_path_factory.mktemp("hostile")
    data = make_tree(base / "data")
    r = run_cli(extract_cmd(data, base / "tmp", *model, "--num_workers", "0"))
    assert r.returncode == 0, r.stderr
    r = run_cli(merge_cmd(base / "tmp", base / "final"))
    assert r.returncode == 0, r.stderr
    return base / "tmp", base / "final"


def copy_final(merged, tmp_path) -> Path:
    import shutil
    final = tmp_path / "final"
    shutil.copytree(merged[1], final)
    return final


def test_a_record_whose_file_entry_is_not_an_object_is_one_line(merged, tmp_path):
    final = copy_final(merged, tmp_path)
    record = json.loads((final / finaldir.RECORD).read_text())
    record["files"][finaldir.SUMMARY] = None
    (final / finaldir.RECORD).write_text(json.dumps(record))
    with pytest.raises(finaldir.FinalDirError, match="complete.json is unreadable"):
        speakerlab.load_embeddings(final)
    for cmd in ([sys.executable, "-m", "speakerlab.report", final], [sys.executable, ROOT / "example_usage.py", final]):
        r = run_cli(cmd)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "complete.json is unreadable" in r.stderr, r.stderr


def test_a_clean_up_killed_at_any_step_can_be_rerun(tmp_path, model, monkeypatch):
    """SIGKILL during stage 3 leaves the run dir part removed; rerunning stage 3 must finish the job
    (not refuse for good with "no scan file" or "no run id"), and still only for its own final dir."""
    from pathlib import Path as _Path
    from speakerlab import cleanup
    from speakerlab.rundir import RunDir
    data = make_tree(tmp_path / "data")
    run, final = tmp_path / "tmp", tmp_path / "final"
    assert run_cli(extract_cmd(data, run, *model, "--num_workers", "0")).returncode == 0
    assert run_cli(merge_cmd(run, final)).returncode == 0
    steps = len(RunDir(run).pipeline_entries()[0])
    backup = tmp_path / "backup"
    import shutil
    shutil.copytree(run, backup)
    for killed_after in range(steps):
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(backup, run)
        removed = []
        real_unlink = _Path.unlink

        def unlink(self, *a, **k):
            if len(removed) == killed_after:
                raise KeyboardInterrupt("killed")  # stands in for SIGKILL: nothing after it runs
            removed.append(self)
            return real_unlink(self, *a, **k)
        monkeypatch.setattr(_Path, "unlink", unlink)
        with pytest.raises(KeyboardInterrupt):
            cleanup.clean(final, run)
        monkeypatch.setattr(_Path, "unlink", real_unlink)
        assert cleanup.main(["--final_dir", str(tmp_path / "other"), "--intermediate_dir", str(run)]) == 1
        assert run.exists()
        assert cleanup.main(["--final_dir", str(final), "--intermediate_dir", str(run)]) == 0, killed_after
        assert not run.exists(), killed_after
    speakerlab.load_embeddings(final)


def test_empty_rank_dirs_left_by_a_killed_clean_up_do_not_block_a_rerun(tmp_path, model):
    """After stage 3 was killed past the scan, only empty rank dirs (and its record) are left: rerunning the
    whole command must extract again, not refuse with 'holds rank results but no scan file'."""
    data = make_tree(tmp_path / "data")
    run = tmp_path / "tmp"
    (run / "rank_00" / "parts").mkdir(parents=True)
    r = run_cli(extract_cmd(data, run, *model, "--num_workers", "0"))
    assert r.returncode == 0, r.stderr
    (run / "scan.npz").unlink()
    (run / "rank_00" / "embeddings.npz").rename(tmp_path / "moved.npz")  # a rank with a file: still refused
    r = run_cli(extract_cmd(data, run, *model, "--num_workers", "0"))
    assert r.returncode == 2 and "holds rank results (rank_00)" in r.stderr, r.stderr


def test_keys_that_clash_only_in_kaldi_files_are_renamed_not_a_traceback(tmp_path, model):
    """'a b.wav' beside 'a_b.wav' (and speaker dirs 's k' beside 's_k'): distinct keys that Kaldi's
    whitespace rule joins. Merge must still write every format, each key once, renames listed."""
    from tests.helpers import tone, write_wav
    data = tmp_path / "data"
    for i, rel in enumerate(("ds/spk/a b.wav", "ds/spk/a_b.wav", "ds/s k/u.wav", "ds/s_k/u.wav")):
        write_wav(data / rel, tone(0.6, seed=i, freq=180 + 40 * i))
    run, final = tmp_path / "tmp", tmp_path / "final"
    assert run_cli(extract_cmd(data, run, *model, "--num_workers", "0")).returncode == 0
    r = run_cli(merge_cmd(run, final, "--formats", "pkl,npz,kaldi"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "renamed in the Kaldi files" in r.stderr
    import kaldiio
    for scp, level in (("xvector.scp", "utterance"), ("spk_xvector.scp", "speaker")):
        names = [line.split()[0] for line in (final / scp).read_text().splitlines()]
        assert len(names) == len(set(names)) == (4 if level == "utterance" else 3)
        assert all(not any(c.isspace() for c in n) for n in names)
        assert len(kaldiio.load_scp(str(final / scp))) == len(names)
    renamed = json.loads((final / "summary.json").read_text())["kaldi_renamed_keys"]
    assert renamed["ds_spk_a b"].startswith("ds_spk_a_b-") and renamed["ds_s k_u"].startswith("ds_s_k_u-")
    assert "ds_spk_a_b" in [line.split()[0] for line in (final / "xvector.scp").read_text().splitlines()]


@pytest.mark.parametrize("tail, reason", [("sample_rate: 8000\n", "key 'sample_rate' is given twice"),
                                          (None, "holds a value that cannot be read")])
def test_configs_with_a_repeated_key_or_a_huge_integer_are_one_line(tmp_path, tail, reason):
    """A second 'sample_rate:' at the end silently won (the model then ran at the wrong rate); a
    5000-digit integer was a ValueError traceback."""
    from tests.helpers import micro_model
    args = micro_model(tmp_path / "m")
    config = Path(args[3])
    text = config.read_text()
    if tail:
        text += tail
    else:
        text = text.replace("embedding_size: 16", "embedding_size: 1" + "0" * 5000)
        assert "0" * 5000 in text
    config.write_text(text)
    data = make_tree(tmp_path / "data")
    r = run_cli(extract_cmd(data, tmp_path / "out", *args, "--check_only"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert reason in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("name, damage", [
    ("metadata.json", lambda d: [d]), ("metadata.json", lambda d: "x"),
    ("metadata.json", lambda d: {**d, "run_id": [1]}), ("metadata.json", lambda d: {**d, "fingerprint": 5}),
    ("scan.npz", lambda d: {**d, "source": "x"}), ("scan.npz", lambda d: {**d, "renames": 5})])
def test_run_dir_files_of_the_wrong_shape_are_one_line_and_a_rerun_repairs_metadata(merged, tmp_path, model,
                                                                                     name, damage):
    """Valid JSON of the wrong shape in scan.json or a rank's metadata.json was an AttributeError /
    TypeError traceback in merge and extract; damaged metadata is now 'unreadable' (the rank is redone),
    a damaged scan names the file."""
    import shutil
    run = tmp_path / "tmp"
    shutil.copytree(merged[0], run)
    path = run / ("rank_00" if name == "metadata.json" else "") / name
    if name == "metadata.json":
        path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    else:  # the scan file's record is a JSON member of the npz
        with np.load(path) as archive:
            members = {member: archive[member] for member in archive.files}
        record = json.loads(members["meta"].tobytes().decode("utf-8"))
        members["meta"] = np.frombuffer(json.dumps(damage(record)).encode("utf-8"), dtype=np.uint8)
        np.savez(path, **members)
    r = run_cli(merge_cmd(run, tmp_path / "final"))
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr
    assert name in r.stderr.strip().splitlines()[-1]
    with np.load(merged[0] / "scan.npz") as archive:
        data = Path(json.loads(archive["meta"].tobytes().decode("utf-8"))["data_root"])
    r = run_cli(extract_cmd(data, run, *model, "--num_workers", "0"))
    assert "Traceback" not in r.stderr, r.stderr
    if name == "metadata.json":
        assert r.returncode == 0 and run_cli(merge_cmd(run, tmp_path / "final")).returncode == 0
    else:
        assert r.returncode == 1 and "scan.npz is unreadable" in r.stderr


@pytest.mark.parametrize("flag, value", [("--batch_size", "0"), ("--batch_size", "-3"), ("--num_workers", "-5"),
                                         ("--streams", "0"), ("--max_chunk_s", "nan"), ("--max_chunk_s", "0"),
                                         ("--header_threads", "0"), ("--flush_every", "0"), ("--gpu", "-1")])
def test_out_of_range_numeric_flags_are_usage_errors(tmp_path, model, flag, value):
    """--header_threads 0 and --max_chunk_s nan were tracebacks, --max_chunk_s 0 failed every file
    (exit 1), --batch_size 0/-3 ran as if valid."""
    data = make_tree(tmp_path / "data")
    r = run_cli(extract_cmd(data, tmp_path / "out", *model, flag, value, "--check_only"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"argument {flag}" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args, words", [(["--cpu_procs", "0"], "--cpu_procs needs at least 1"),
                                         (["--nnodes", "0"], "--nnodes needs at least 1"),
                                         (["--stage", "3", "--stop_stage", "1"], "runs no stage"),
                                         (["--stop_stage", "4"], "runs no stage")])
def test_driver_flags_that_run_nothing_or_crash_torchrun_are_usage_errors(tmp_path, args, words):
    """--cpu_procs 0 was a torchrun AssertionError traceback (exit 1); --stage 3 --stop_stage 1 and
    --nnodes 0 exited 0 having done nothing or ignored the flag."""
    r = run_cli(["bash", ROOT / "run_embedding_extraction.sh", "--data_root", tmp_path, *args], cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
    assert not r.stdout
