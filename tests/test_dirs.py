"""Directories you can trust (issue 11): clean-up removes only what the pipeline wrote, one job per
run dir, final dirs replaced whole and checked against their completeness record, no unpickling
unless asked, broken "complete" ranks repaired, environment errors as one line."""
import errno
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import speakerlab
from speakerlab import finaldir, report, score
from speakerlab.rundir import RunDir
from tests.helpers import ROOT, extract_cmd, merge_cmd, micro_model, run_cli, tone, write_wav


# --- helpers ---------------------------------------------------------------------------------
def make_tree(root: Path, seed: int = 0, names=("u1", "u2")) -> Path:
    for s, speaker in enumerate(("a", "b")):
        for u, name in enumerate(names):
            write_wav(root / "ds" / speaker / f"{name}.wav", tone(0.6 + 0.1 * u, seed=seed + 10 * s + u,
                                                                 freq=200 + 60 * s))
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return micro_model(tmp_path_factory.mktemp("model"))


def extract(argv, capsys, monkeypatch, env=None):
    """extract.main in this process, as one plain rank; (exit status, stderr)."""
    from speakerlab.extract import main
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "SLURM_PROCID", "SLURM_JOB_ID", "SPEAKERLAB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def run_extract(data, out, model, capsys, monkeypatch, *extra):
    return extract(extract_cmd(data, out, *model, "--num_workers", "0", *extra)[2:], capsys, monkeypatch)


def merge(inputs, output, *extra):
    from speakerlab.merge import main
    return main(["--input_dir", *map(str, inputs), "--output_dir", str(output), *extra])


def snapshot(root: Path) -> dict:
    """Every file under root with its bytes' size and mtime: 'nothing removed' checks."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def mount_tmpfs(path: Path, size: str, read_only: bool = False) -> bool:
    """A small tmpfs at ``path`` (root only); False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


# --- item 1: stage 3 removes only what the pipeline wrote -------------------------------------
def cleanup(final_dir, intermediate, *extra):
    from speakerlab.cleanup import main
    return main(["--final_dir", str(final_dir), "--intermediate_dir", str(intermediate), *map(str, extra)])


@pytest.mark.parametrize("layout", ["run_dir_contains_data_and_final", "run_dir_is_data_root",
                                    "final_inside_run_dir", "run_dir_inside_data_root"])
def test_cleanup_refuses_nested_dirs_and_removes_nothing(tmp_path, model, capsys, monkeypatch, layout):
    w = tmp_path / "W"
    data = make_tree(w / "data")
    out, final = {"run_dir_contains_data_and_final": (w, w / "final"),
                  "run_dir_is_data_root": (w / "data", w / "final"),
                  "final_inside_run_dir": (w / "tmp", w / "tmp" / "final"),
                  "run_dir_inside_data_root": (w / "data" / "tmp", w / "final")}[layout]
    code, err = run_extract(data, out, model, capsys, monkeypatch)
    assert code == 0, err
    assert merge([out], final) == 0
    before = snapshot(w)
    assert cleanup(final, out) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: not removing {out}: it ") and err.count("\n") == 1, err
    assert snapshot(w) == before
    speakerlab.load_embeddings(final)  # the final dir is untouched and still verifies


def test_cleanup_refuses_a_final_dir_merged_from_another_run(tmp_path, model, capsys, monkeypatch):
    data = make_tree(tmp_path / "data")
    for name in ("tmpA", "tmpB"):
        code, err = run_extract(data, tmp_path / name, model, capsys, monkeypatch)
        assert code == 0, err
    assert merge([tmp_path / "tmpB"], tmp_path / "B") == 0
    before = snapshot(tmp_path / "tmpA")
    assert cleanup(tmp_path / "B", tmp_path / "tmpA") == 1
    err = capsys.readouterr().err
    assert "was not merged from it" in err and "Traceback" not in err
    assert snapshot(tmp_path / "tmpA") == before
    # the run it was merged from goes, and only the pipeline's files: a user's file stays, with the dir
    (tmp_path / "tmpB" / "notes.txt").write_text("mine")
    (tmp_path / "tmpB" / "rank_00" / "keep.me").write_text("mine too")
    assert cleanup(tmp_path / "B", tmp_path / "tmpB") == 0
    assert "kept the dir" in capsys.readouterr().out
    left = sorted(str(p.relative_to(tmp_path / "tmpB")) for p in (tmp_path / "tmpB").rglob("*"))
    assert left == ["notes.txt", "rank_00", "rank_00/keep.me"]


def test_cleanup_refuses_while_an_extraction_holds_the_dir(tmp_path, model, capsys, monkeypatch):
    data = make_tree(tmp_path / "data")
    out, final = tmp_path / "tmp", tmp_path / "final"
    code, err = run_extract(data, out, model, capsys, monkeypatch)
    assert code == 0, err
    assert merge([out], final) == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom speakerlab.rundir import RunDir\n"
         "RunDir(sys.argv[1]).claim('run-Z')\nprint('held', flush=True)\ntime.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(out)
        assert cleanup(final, out) == 1
        assert "an extraction still runs in it" in capsys.readouterr().err and snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()


def test_cleanup_refuses_a_run_dir_holding_manifest_audio(tmp_path, model, capsys, monkeypatch):
    out = tmp_path / "tmp"
    audio = write_wav(out / "audio" / "x.wav", tone(0.8, seed=3))
    write_wav(tmp_path / "y.wav", tone(0.9, seed=4))
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"path,speaker,dataset\n{audio},s1,m\n{tmp_path / 'y.wav'},s2,m\n")
    code, err = extract(["--manifest", manifest, "--output_dir", out, *model, "--num_workers", "0",
                         "--no_progress"], capsys, monkeypatch)
    assert code == 0, err
    assert merge([out], tmp_path / "final") == 0
    assert cleanup(tmp_path / "final", out) == 1
    assert "contains audio of the run" in capsys.readouterr().err and audio.is_file()


def test_cleanup_refuses_an_incomplete_or_altered_final_dir(tmp_path, model, capsys, monkeypatch):
    data = make_tree(tmp_path / "data")
    out, final = tmp_path / "tmp", tmp_path / "final"
    code, err = run_extract(data, out, model, capsys, monkeypatch)
    assert code == 0, err
    assert merge([out], final) == 0
    npz = final / "utterance_embeddings.npz"
    content = npz.read_bytes()
    npz.write_bytes(content[:-8] + bytes(8))  # same size, other bytes: only the digest tells
    assert cleanup(final, out) == 1
    assert "sha256 differs" in capsys.readouterr().err and (out / "scan.npz").is_file()
    npz.write_bytes(content)
    (final / finaldir.RECORD).unlink()
    assert cleanup(final, out) == 1
    assert "complete.json is missing" in capsys.readouterr().err and (out / "rank_00").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["W_data_W_final", "W_is_data", "W_tmp_final", "other_run"])
def test_driver_stage_3_never_removes_what_it_did_not_write(tmp_path, model, layout):
    w = tmp_path / "W"
    data = make_tree(w / "data")
    output, final = {"W_data_W_final": (w, w / "final"), "W_is_data": (w / "data", w / "final"),
                     "W_tmp_final": (w / "tmp", w / "tmp" / "final"), "other_run": (w / "tmpA", w / "B")}[layout]

    def driver(out, fin, *flags):
        return run_cli(["bash", ROOT / "run_embedding_extraction.sh", "--data_root", data, "--output_dir", out,
                        "--final_output_dir", fin, *model, "--cpu_procs", "1",
                        "--extra_args", "--no_progress --num_workers 0", *flags], env={"CUDA_VISIBLE_DEVICES": ""})

    if layout == "other_run":
        r = driver(w / "tmpB", final, "--stop_stage", "2")
        assert r.returncode == 0, r.stderr[-2000:]
        r = driver(output, final, "--stop_stage", "1")
    else:
        r = driver(output, final, "--stop_stage", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    before = snapshot(w)
    r = driver(output, final, "--stage", "3")
    assert r.returncode == 1 and f"error: not removing {output}: " in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert snapshot(w) == before


# --- item 2: one job per run dir ---------------------------------------------------------------
def test_a_live_job_holds_the_dir_and_a_dead_one_is_taken_over(tmp_path, model, capsys, monkeypatch, caplog):
    data = make_tree(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom speakerlab.rundir import RunDir\n"
         "RunDir(sys.argv[1]).claim('run-Y')\nprint('held', flush=True)\ntime.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = run_extract(data, out, model, capsys, monkeypatch)
        assert code == 2 and "is in use by another extraction (run run-Y" in err
        assert f"pid {holder.pid}" in err and err.count("\n") == 1
        assert not (out / "scan.npz").exists() and not (out / "rank_00").exists()
    finally:
        holder.kill()
        holder.wait()
    caplog.set_level("WARNING", logger="speakerlab")
    code, err = run_extract(data, out, model, capsys, monkeypatch)
    assert code == 0, err
    assert "taking over" in caplog.text and "run-Y" in caplog.text
    lock = json.loads((out / "extract.lock").read_text())
    meta = json.loads((out / "rank_00" / "metadata.json").read_text())
    assert meta["run_id"] == lock["run_id"] != "run-Y" and lock["released"]


HOOK = '''
import os, time
if os.environ.get("SPEAKERLAB_TEST_SLOW_SCAN"):
    import speakerlab.data as _data
    _read = _data.read_headers
    def _slow(*args, **kwargs):
        time.sleep(float(os.environ["SPEAKERLAB_TEST_SLOW_SCAN"]))
        return _read(*args, **kwargs)
    _data.read_headers = _slow
'''


@pytest.mark.slow
def test_two_runs_into_one_dir_do_not_mix(tmp_path, model):
    """Run Y (a slow scan) and run X (other audio, same layout) started together into one dir: X is
    refused at once, Y's results are Y's own."""
    data_y = make_tree(tmp_path / "y", seed=1)
    data_x = make_tree(tmp_path / "x", seed=2)
    out = tmp_path / "out"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    env = dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{ROOT}", SPEAKERLAB_TEST_SLOW_SCAN="4")
    y = subprocess.Popen([str(a) for a in extract_cmd(data_y, out, *model, "--num_workers", "0")],
                         env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "extract.lock").is_file() or not (out / "extract.lock").read_text():
        assert time.monotonic() < deadline and y.poll() is None
        time.sleep(0.1)
    x = run_cli(extract_cmd(data_x, out, *model, "--num_workers", "0"))
    assert x.returncode == 2 and "is in use by another extraction" in x.stderr and "Traceback" not in x.stderr
    _, y_err = y.communicate(timeout=300)
    assert y.returncode == 0, y_err[-2000:]
    r = run_cli(merge_cmd(out, tmp_path / "final"))
    assert r.returncode == 0, r.stderr
    paths = [u["path"] for u in json.loads((tmp_path / "final" / "utterance_list.json").read_text())]
    assert len(paths) == 4 and all(p.startswith(str(data_y)) for p in paths)


@pytest.mark.slow
def test_a_scan_killed_half_way_leaves_nothing_to_adopt(tmp_path, model):
    out = tmp_path / "out"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    env = dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{ROOT}", SPEAKERLAB_TEST_SLOW_SCAN="30")
    y = subprocess.Popen([str(a) for a in extract_cmd(make_tree(tmp_path / "y", seed=1), out, *model,
                                                      "--num_workers", "0")],
                         env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out / "extract.lock").is_file() or not (out / "extract.lock").read_text():
        assert time.monotonic() < deadline and y.poll() is None
        time.sleep(0.1)
    time.sleep(0.5)
    y.kill()
    y.wait()
    assert not (out / "scan.npz").exists()
    data_x = make_tree(tmp_path / "x", seed=2)
    r = run_cli(extract_cmd(data_x, out, *model, "--num_workers", "0"))
    assert r.returncode == 0 and "taking over" in r.stderr, r.stderr[-2000:]
    r = run_cli(merge_cmd(out, tmp_path / "final"))
    assert r.returncode == 0, r.stderr
    paths = [u["path"] for u in json.loads((tmp_path / "final" / "utterance_list.json").read_text())]
    assert len(paths) == 4 and all(p.startswith(str(data_x)) for p in paths)


def test_merge_refuses_ranks_made_from_another_scan(tmp_path, model, capsys, monkeypatch):
    out_x, out_y = tmp_path / "x", tmp_path / "y"
    code, err = run_extract(make_tree(tmp_path / "dx", seed=1), out_x, model, capsys, monkeypatch)
    assert code == 0, err
    code, err = run_extract(make_tree(tmp_path / "dy", seed=2, names=("u1", "u2", "u3")), out_y, model,
                            capsys, monkeypatch)
    assert code == 0, err
    (out_x / "scan.npz").write_bytes((out_y / "scan.npz").read_bytes())  # Y's scan beside X's ranks
    assert merge([out_x], tmp_path / "final") == 2
    err = capsys.readouterr().err
    assert "rank_00 was made from another scan than the scan.npz beside it" in err
    assert not (tmp_path / "final").exists()


def test_refused_scan_leaves_no_scan_file(tmp_path, model, capsys, monkeypatch):
    data = make_tree(tmp_path / "data")
    out = tmp_path / "out"
    (out / "rank_01").mkdir(parents=True)  # results of some other run, without their scan
    (out / "rank_01" / "metadata.json").write_text("{}")  # (an empty rank dir holds no results)
    code, err = run_extract(data, out, model, capsys, monkeypatch)
    assert code == 2 and "holds rank results (rank_01) but no scan.npz" in err
    assert sorted(p.name for p in out.iterdir()) == ["extract.lock", "rank_01"]


@pytest.mark.slow
def test_all_ranks_of_a_torchrun_job_share_the_run_id(tmp_path, model):
    data = make_tree(tmp_path / "data", names=("u1", "u2", "u3"))
    out = tmp_path / "out"
    r = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 *extract_cmd(data, out, *model, "--num_workers", "0")[1:]])
    assert r.returncode == 0, r.stderr[-3000:]
    ids = {json.loads((out / f"rank_{r:02d}" / "metadata.json").read_text())["run_id"] for r in (0, 1)}
    assert ids == {json.loads((out / "extract.lock").read_text())["run_id"]}
    assert merge([out], tmp_path / "final") == 0
    record = json.loads((tmp_path / "final" / "complete.json").read_text())
    assert record["run_ids"] == sorted(ids) and record["runs"][0]["run_ids"] == sorted(ids)


# --- item 4: final dirs replaced whole, readers refuse incomplete ones --------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model):
    base = tmp_path_factory.mktemp("dirs")
    data = make_tree(base / "data")
    r = run_cli(extract_cmd(data, base / "tmp", *model, "--num_workers", "0"))
    assert r.returncode == 0, r.stderr
    return base / "tmp"


def test_a_merge_with_fewer_formats_leaves_no_old_file(run_dir, tmp_path, capsys):
    final = tmp_path / "final"
    assert merge([run_dir], final, "--formats", "pkl,npz,kaldi") == 0
    import kaldiio
    kaldi = kaldiio.load_scp(str(final / "xvector.scp"))  # the scp names the ark where it ended up
    emb = speakerlab.load_embeddings(final)
    assert sorted(kaldi) == emb.keys
    np.testing.assert_array_equal(kaldi[emb.keys[0]], emb.matrix()[1][0])
    assert merge([run_dir], final, "--formats", "pkl") == 0
    names = sorted(p.name for p in final.iterdir())
    assert names == sorted(["complete.json", "summary.json", "utterance_embeddings.pkl", "speaker_embeddings.pkl",
                            "utterance_list.json", "speaker_list.json", "failures.json"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no build or old dir left
    with pytest.raises(ValueError, match="only as a pickle"):
        speakerlab.load_embeddings(final)
    with pytest.raises(score.ScoreError, match="only as a pickle"):
        score.load_embeddings(final)


def test_readers_refuse_a_final_dir_without_or_against_its_record(run_dir, tmp_path, capsys):
    final = tmp_path / "final"
    assert merge([run_dir], final) == 0
    (final / "xvector.ark").write_bytes(b"old numbers")  # a file no merge of this dir wrote
    for read in (speakerlab.load_embeddings, score.EmbeddingTable.from_dir, report.render):
        with pytest.raises((ValueError, report.ReportError), match="xvector.ark is not part of the recorded merge"):
            read(final)
    (final / "xvector.ark").unlink()
    (final / "speaker_list.json").write_text("[]")
    with pytest.raises(ValueError, match="speaker_list.json has 2 bytes, the record says"):
        speakerlab.load_embeddings(final)
    (final / finaldir.RECORD).unlink()  # e.g. a merge killed before its record
    with pytest.raises(ValueError, match="complete.json is missing"):
        speakerlab.load_embeddings(final)
    trials = tmp_path / "trials.txt"
    trials.write_text("ds_a_u1 ds_b_u1 nontarget\n")
    for cmd in ([sys.executable, "-m", "speakerlab.score", "--embeddings", final, "--trials", trials],
                [sys.executable, "-m", "speakerlab.report", final],
                [sys.executable, ROOT / "example_usage.py", final]):
        r = run_cli(cmd)
        assert r.returncode == 2 and "complete.json is missing" in r.stderr and "Traceback" not in r.stderr, cmd


def test_merge_killed_before_the_record_leaves_the_old_dir(run_dir, tmp_path, monkeypatch):
    final = tmp_path / "final"
    assert merge([run_dir], final) == 0
    before = snapshot(final)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finaldir, "_swap_in", killed)
    with pytest.raises(KeyboardInterrupt):
        merge([run_dir], final, "--formats", "pkl,npz,kaldi")
    assert snapshot(final) == before and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_merge_refuses_to_replace_a_dir_with_foreign_files(run_dir, tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("precious")
    assert merge([run_dir], target) == 2
    assert "holds files a merge did not write (thesis.tex)" in capsys.readouterr().err
    assert sorted(p.name for p in target.iterdir()) == ["thesis.tex"]


# --- item 5: no unpickling unless asked ---------------------------------------------------------
class Boom:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["SPEAKERLAB_TEST_MARKER"]),))


def test_pickles_are_never_unpickled_unless_asked(run_dir, tmp_path, monkeypatch):
    marker = tmp_path / "code_ran"
    monkeypatch.setenv("SPEAKERLAB_TEST_MARKER", str(marker))
    final = tmp_path / "final"
    assert merge([run_dir], final) == 0
    (final / "utterance_embeddings.pkl").write_bytes(pickle.dumps({"k": Boom()}))
    (final / "utterance_list.json").unlink()  # the case: npz present, its list missing
    with pytest.raises(ValueError, match="does not match its complete.json: utterance_embeddings.pkl has"):
        speakerlab.load_embeddings(final)
    # even with a record forged to match, the pickle is not opened: the npz is read, the list is missing
    record = json.loads((final / finaldir.RECORD).read_text())
    record["files"] = {name: dict(info, bytes=(final / name).stat().st_size)
                       for name, info in record["files"].items() if (final / name).exists()}
    (final / finaldir.RECORD).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="utterance_list.json: unreadable"):
        speakerlab.load_embeddings(final)
    r = run_cli([sys.executable, ROOT / "example_usage.py", final], env={"SPEAKERLAB_TEST_MARKER": str(marker)})
    assert r.returncode == 2 and "utterance_list.json: unreadable" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()
    # only pickles: says so and how to opt in; example_usage.py opts in with --allow_pickle
    pkl_only = tmp_path / "pkl_only"
    assert merge([run_dir], pkl_only, "--formats", "pkl") == 0
    r = run_cli([sys.executable, ROOT / "example_usage.py", pkl_only, "--no_report"])
    assert r.returncode == 2 and "allow_pickle=True (--allow_pickle)" in r.stderr and "Traceback" not in r.stderr
    r = run_cli([sys.executable, ROOT / "example_usage.py", pkl_only, "--no_report", "--allow_pickle"])
    assert r.returncode == 0, r.stderr[-2000:]


# --- item 7: a "complete" rank with missing or damaged results ----------------------------------
@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_broken_complete_rank_is_named_by_merge_and_redone_by_a_rerun(tmp_path, model, capsys, monkeypatch,
                                                                         damage):
    data = make_tree(tmp_path / "data")
    out = tmp_path / "tmp"
    code, err = run_extract(data, out, model, capsys, monkeypatch)
    assert code == 0, err
    assert merge([out], tmp_path / "good") == 0
    npz = out / "rank_00" / "embeddings.npz"
    if damage == "missing":
        npz.unlink()
    else:
        npz.write_bytes(b"PK\x03\x04" + bytes(100))
    assert merge([out], tmp_path / "final") == 2
    err = capsys.readouterr().err
    assert "rank_00 is marked complete but" in err and "rerun the extraction with the same arguments" in err
    assert "Traceback" not in err and err.count("\n") == 1
    code, err = run_extract(data, out, model, capsys, monkeypatch)
    assert code == 0 and "already complete" not in err
    assert merge([out], tmp_path / "final") == 0
    good, again = speakerlab.load_embeddings(tmp_path / "good"), speakerlab.load_embeddings(tmp_path / "final")
    assert again.keys == good.keys
    np.testing.assert_allclose(again.matrix()[1], good.matrix()[1], rtol=1e-5, atol=1e-6)


def test_complete_rank_missing_its_pickles_gets_them_back_without_redoing(tmp_path, model, capsys, monkeypatch,
                                                                          caplog):
    data = make_tree(tmp_path / "data")
    out = tmp_path / "tmp"
    code, err = run_extract(data, out, model, capsys, monkeypatch)
    assert code == 0, err
    rank = out / "rank_00"
    with open(rank / "utterance_embeddings.pkl", "rb") as handle:
        before = pickle.load(handle)
    stamp = (rank / "embeddings.npz").read_bytes()
    (rank / "utterance_embeddings.pkl").unlink()
    caplog.set_level("INFO", logger="speakerlab")
    code, err = run_extract(data, out, model, capsys, monkeypatch)
    assert code == 0 and "utterance_embeddings.pkl missing: rewriting" in caplog.text
    assert "utterances to do" not in caplog.text and (rank / "embeddings.npz").read_bytes() == stamp
    with open(rank / "utterance_embeddings.pkl", "rb") as handle:
        after = pickle.load(handle)
    assert sorted(after) == sorted(before)
    for key in before:
        np.testing.assert_array_equal(after[key]["embedding"], before[key]["embedding"])
        assert {k: v for k, v in after[key].items() if k != "embedding"} == \
            {k: v for k, v in before[key].items() if k != "embedding"}


# --- item 8: environment errors are one line -----------------------------------------------------
def test_truncated_scan_file_is_one_line(tmp_path, model, capsys, monkeypatch):
    data = make_tree(tmp_path / "data")
    out = tmp_path / "tmp"
    code, err = run_extract(data, out, model, capsys, monkeypatch)
    assert code == 0, err
    scan = out / "scan.npz"
    scan.write_bytes(scan.read_bytes()[:50])
    code, err = run_extract(data, out, model, capsys, monkeypatch)
    assert code == 1 and err.startswith(f"error: {scan} is unreadable") and err.count("\n") == 1, err
    assert "--overwrite" in err
    assert merge([out], tmp_path / "final") == 1
    assert f"{scan} is unreadable" in capsys.readouterr().err
    code, err = run_extract(data, out, model, capsys, monkeypatch, "--overwrite")
    assert code == 0, err


def test_disk_full_is_one_line_and_leaves_no_temp_files(tmp_path, model, capsys, monkeypatch):
    """ENOSPC while flushing results (simulated where the bytes are written)."""
    import speakerlab.store as store_mod
    data = make_tree(tmp_path / "data")
    out = tmp_path / "tmp"
    real_savez = np.savez

    def full(path, **arrays):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full)
    code, err = run_extract(data, out, model, capsys, monkeypatch)
    monkeypatch.setattr(np, "savez", real_savez)
    assert code == 1 and "No space left on device" in err and "part_000001.npz" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not [p for p in out.rglob("*") if store_mod.is_temp_name(p.name)]
    # merge into a full disk: one line, nothing half-written left beside the target
    code, err = run_extract(data, out, model, capsys, monkeypatch)
    assert code == 0, err
    monkeypatch.setattr(np, "savez", full)
    assert merge([out], tmp_path / "final") == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "tmp"]


def test_disk_full_on_a_real_tiny_filesystem(tmp_path, model, capsys, monkeypatch):
    if os.geteuid() != 0 or not mount_tmpfs(tmp_path / "small", "12k"):
        pytest.skip("needs root to mount a tmpfs")
    try:
        data = make_tree(tmp_path / "data", names=tuple(f"u{i}" for i in range(12)))
        out = tmp_path / "small" / "tmp"
        code, err = run_extract(data, out, model, capsys, monkeypatch, "--flush_every", "4")
        assert code == 1 and "No space left on device" in err and err.count("\n") == 1, err
        assert not [p for p in (tmp_path / "small").rglob("*") if p.name.startswith(".")]
    finally:
        umount(tmp_path / "small")


def test_read_only_output_dir_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    data = make_tree(tmp_path / "data")
    if os.geteuid() == 0:
        if not mount_tmpfs(tmp_path / "ro", "1m", read_only=True):
            pytest.skip("needs root to mount a read-only tmpfs")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
    try:
        # a checkpoint that does not exist: the dir is checked first, so its error is the one told
        code, err = extract(extract_cmd(data, tmp_path / "ro" / "out", "--model_path", tmp_path / "nope.ckpt",
                                        "--config_file", ROOT / "conf" / "campplus.yaml")[2:], capsys, monkeypatch)
        assert code == 1 and err.startswith(f"error: cannot create {tmp_path / 'ro' / 'out'}: ") and \
            err.count("\n") == 1, err
        assert "Read-only file system" in err or "Permission denied" in err
    finally:
        if os.geteuid() == 0:
            umount(tmp_path / "ro")


# --- item 9: every setting that changes the numbers is in the resume fingerprint -----------------
def test_resume_with_other_fusion_is_refused(tmp_path, model, capsys, monkeypatch):
    data = make_tree(tmp_path / "data")
    out = tmp_path / "tmp"
    # --dtype fp32: with auto, fused and unfused may each measure another dtype fastest (also refused)
    code, err = run_extract(data, out, model, capsys, monkeypatch, "--dtype", "fp32")
    assert code == 0, err
    code, err = run_extract(data, out, model, capsys, monkeypatch, "--no_fusion", "--dtype", "fp32")
    assert code == 2 and "was made differently (fused: True -> False)" in err
    meta = json.loads((out / "rank_00" / "metadata.json").read_text())
    assert meta["fingerprint"]["fused"] is True and meta["batch_policy"]["fused"] is True


def test_a_rank_still_running_after_its_rank_0_keeps_the_dir(tmp_path):
    """Rank 0 ended (lock released) while rank 1 of the same job still runs: a new job is refused."""
    from speakerlab.rundir import RunDirBusy
    out = tmp_path / "out"
    out.mkdir()
    run_dir = RunDir(out)
    lock = run_dir.claim("run-R")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rank1 = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom speakerlab.rundir import RunDir\n"
         "RunDir(sys.argv[1]).join(1, 'run-R')\nprint('held', flush=True)\ntime.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert rank1.stdout.readline().strip() == "held"
        run_dir.release(lock)
        with pytest.raises(RunDirBusy, match="a rank of another extraction still runs"):
            run_dir.claim("run-S")
        with pytest.raises(RunDirBusy, match="held by another extraction .*run-R"):
            run_dir.join(2, "run-S")
    finally:
        rank1.kill()
        rank1.wait()
    run_dir.release(run_dir.claim("run-S"))


def test_build_dirs_of_killed_merges_are_removed(run_dir, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = tmp_path / f".final.tmp{dead.pid}"
    (leftover / "sub").mkdir(parents=True)
    live = tmp_path / f".final.tmp{os.getppid()}"
    live.mkdir()
    assert merge([run_dir], tmp_path / "final") == 0
    assert not leftover.exists() and live.is_dir()
    speakerlab.load_embeddings(tmp_path / "final")


def test_cleanup_refuses_a_run_dir_above_the_base_of_relative_paths(tmp_path, model, capsys, monkeypatch):
    base = tmp_path / "W" / "corpus"
    write_wav(base / "x.wav", tone(0.8, seed=3))
    write_wav(base / "y.wav", tone(0.9, seed=4))
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,speaker,dataset\nx.wav,s1,m\ny.wav,s2,m\n")
    out = tmp_path / "W"
    code, err = extract(["--manifest", manifest, "--data_root", base, "--output_dir", out, *model,
                         "--num_workers", "0", "--no_progress"], capsys, monkeypatch)
    assert code == 0, err
    (base / "unlisted.txt").write_text("not in the manifest, still not ours")
    assert merge([out], tmp_path / "final") == 0
    before = snapshot(tmp_path / "W")
    assert cleanup(tmp_path / "final", out) == 1
    err = capsys.readouterr().err
    assert "contains the base dir of the input's relative paths" in err or "contains audio" in err
    assert snapshot(tmp_path / "W") == before


def test_a_filesystem_without_posix_locks_warns_instead_of_refusing(tmp_path, monkeypatch, caplog):
    import fcntl
    import speakerlab.rundir as rundir_mod

    def no_locks(*args, **kwargs):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(rundir_mod.fcntl, "lockf", no_locks)
    caplog.set_level("WARNING", logger="speakerlab")
    run_dir = RunDir(tmp_path / "out")
    run_dir.ensure_writable()
    lock = run_dir.claim("run-N")
    assert "has no POSIX locks" in caplog.text and lock.content()["run_id"] == "run-N"
    run_dir.release(lock)

