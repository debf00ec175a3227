"""Crashes and restarts: a SIGKILLed rank resumes to the uninterrupted result; finished dirs are a
no-op; a dir made differently is refused; merge never reads unfinished ranks."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROOT, extract_cmd, merge_cmd, micro_model, run_cli, tone, write_wav

NUM_GOOD = 40


def make_tree(root):
    for i in range(NUM_GOOD):
        write_wav(root / f"ds{i % 2}" / f"spk{i % 5}" / f"u{i:02d}.wav", tone(0.6 + 0.05 * (i % 9), seed=i,
                                                                              freq=150 + 7 * i))
    (root / "ds0" / "spk0" / "broken.wav").write_text("not audio")
    write_wav(root / "ds1" / "spk1" / "silent.wav", np.zeros(8000, np.float32))
    return root


MODEL_ARGS = []  # filled by the setup fixture: the micro model, shared by every run here


def common_args():
    return [*MODEL_ARGS, "--dtype", "fp32", "--batch_size", "2", "--flush_every", "2"]


def load_utts(final):
    with open(final / "utterance_embeddings.pkl", "rb") as handle:
        utts = pickle.load(handle)
    failures = json.loads((final / "failures.json").read_text())
    return utts, failures


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    MODEL_ARGS[:] = micro_model(base / "model")
    root = make_tree(base / "data")
    r = run_cli(extract_cmd(root, base / "clean", *common_args()))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(merge_cmd(base / "clean", base / "clean_final"))
    assert r.returncode == 0, r.stderr[-3000:]
    return base, root


def parts(out):
    return sorted((out / "rank_00" / "parts").glob("part_*.npz")) if (out / "rank_00" / "parts").is_dir() else []


@pytest.mark.slow
def test_kill_and_resume_equals_clean_run(setup):
    base, root = setup
    out = base / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([str(a) for a in extract_cmd(root, out, *common_args())], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while len(parts(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        finished_first = proc.poll() is not None
    finally:  # the rank and its decode worker, killed without a chance to clean up
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not finished_first, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.stderr.close()
    flushed = len(parts(out))
    assert flushed >= 3
    meta = json.loads((out / "rank_00" / "metadata.json").read_text())
    assert meta["complete"] is False

    # merge never reads what an unfinished rank left behind
    r = run_cli(merge_cmd(out, base / "killed_final"))
    assert r.returncode == 2 and "rank_00: incomplete" in r.stderr, r.stderr
    assert not (base / "killed_final" / "summary.json").exists()

    r = run_cli(extract_cmd(root, out, *common_args()))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming, " in r.stderr
    done = int(r.stderr.split("resuming, ")[1].split()[0])
    assert 2 * flushed <= done < NUM_GOOD + 2
    r = run_cli(merge_cmd(out, base / "killed_final"))
    assert r.returncode == 0, r.stderr[-3000:]

    clean, clean_failures = load_utts(base / "clean_final")
    resumed, resumed_failures = load_utts(base / "killed_final")
    assert sorted(resumed) == sorted(clean) and len(clean) == NUM_GOOD
    for key in clean:  # other batch companions after the restart: equal up to float rounding
        np.testing.assert_allclose(resumed[key]["embedding"], clean[key]["embedding"], rtol=1e-4, atol=1e-5)
    assert [f["key"] for f in resumed_failures] == [f["key"] for f in clean_failures] == \
        ["ds0_spk0_broken", "ds1_spk1_silent"]
    summary = json.loads((base / "killed_final" / "summary.json").read_text())
    assert summary["total_input_files"] == NUM_GOOD + 2 and summary["failures"] == 2


def test_decode_workers_start_before_the_model_on_a_fresh_rank_only(setup, tmp_path):
    """A fresh rank (or one --overwrite redoes) starts its decode workers before the model loads, its
    to-do list being its whole shard; a rank that resumes starts them once the engine, and so what is
    done, is known. The numbers are the same either way."""
    import shutil
    base, root = setup
    clean = json.loads((base / "clean" / "rank_00" / "metadata.json").read_text())
    assert clean["batch_policy"]["workers_started_early"] is True
    out = tmp_path / "again"
    shutil.copytree(base / "clean", out)
    r = run_cli(extract_cmd(root, out, *common_args(), "--overwrite"))
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((out / "rank_00" / "metadata.json").read_text())
    assert meta["batch_policy"]["workers_started_early"] is True and meta["counts"] == clean["counts"]
    meta["complete"] = False  # as if killed before it finished, nothing flushed: redone, not early
    (out / "rank_00" / "metadata.json").write_text(json.dumps(meta))
    r = run_cli(extract_cmd(root, out, *common_args()))
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((out / "rank_00" / "metadata.json").read_text())
    assert meta["batch_policy"]["workers_started_early"] is False and meta["counts"] == clean["counts"]
    r = run_cli(merge_cmd(out, tmp_path / "again_final"))
    assert r.returncode == 0, r.stderr[-3000:]
    again, again_failures = load_utts(tmp_path / "again_final")
    want, want_failures = load_utts(base / "clean_final")
    assert sorted(again) == sorted(want) and again_failures == want_failures
    for key in want:
        np.testing.assert_allclose(again[key]["embedding"], want[key]["embedding"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", ["engine", "checkpoint"])
def test_overwrite_with_a_bad_model_choice_fails_before_the_scan_and_keeps_the_run(setup, tmp_path, bad):
    """--overwrite redoes a rank only once the new model has loaded: a dtype/backend this machine cannot
    serve, or a damaged checkpoint, fails in a second (before the scan) and the complete run stays."""
    import shutil
    base, root = setup
    out = tmp_path / "kept"
    shutil.copytree(base / "clean", out)
    before = (out / "rank_00" / "metadata.json").read_text()
    args = common_args()
    if bad == "engine":
        args = [a for a in args if a not in ("--dtype", "fp32")] + ["--backend", "openvino", "--dtype", "fp16"]
    else:
        model = Path(args[args.index("--model_path") + 1])
        broken = tmp_path / "broken.pt"
        broken.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
        args[args.index("--model_path") + 1] = str(broken)
    r = run_cli(extract_cmd(root, out, *args, "--overwrite"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "scanned" not in r.stderr and ("fp16" in r.stderr or "broken.pt" in r.stderr), r.stderr[-3000:]
    assert (out / "rank_00" / "metadata.json").read_text() == before
    assert (out / "rank_00" / "embeddings.npz").is_file()


def test_finished_dir_is_a_no_op(setup):
    base, root = setup
    final_npz = base / "clean" / "rank_00" / "embeddings.npz"
    stamp = final_npz.stat().st_mtime_ns
    r = run_cli(extract_cmd(root, base / "clean", *common_args()))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "already complete" in r.stderr and "utterances to do" not in r.stderr
    assert final_npz.stat().st_mtime_ns == stamp


def run_main(argv, capsys, monkeypatch, env=None):
    from speakerlab.extract import main
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                 "SLURM_JOB_ID", "SPEAKERLAB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("change, words", [
    ("model", "model_sha256"),
    ("channels", "channels: 'first' -> 'mean'"),
    ("data", "holds a scan of"),
    ("world", "world_size: 1 -> 2"),
])
def test_made_differently_is_refused(setup, tmp_path, capsys, monkeypatch, change, words):
    base, root = setup
    args = common_args()
    env = None
    if change == "model":
        args = micro_model(tmp_path / "other", seed=1) + args[4:]
    elif change == "channels":
        args += ["--channels", "mean"]
    elif change == "data":
        root = make_tree(tmp_path / "data")
    elif change == "world":
        env = {"RANK": "0", "WORLD_SIZE": "2", "SPEAKERLAB_RUN_ID": "refused"}
    stamp = (base / "clean" / "rank_00" / "embeddings.npz").stat().st_mtime_ns
    code, err = run_main(extract_cmd(root, base / "clean", *args)[2:], capsys, monkeypatch, env)
    assert code == 2, err
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and words in line[0] and "--overwrite" in line[0], err
    assert (base / "clean" / "rank_00" / "embeddings.npz").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_world_size_change_and_partial_merge(setup, tmp_path, capsys, monkeypatch):
    """Rank 0 of 2 finishes alone: merge names the missing rank, --allow_partial merges what is there;
    a one-process rerun over that dir is refused, and --overwrite redoes it with the stale rank gone."""
    base, root = setup
    out = tmp_path / "two"
    code, err = run_main(extract_cmd(root, out, *common_args())[2:], capsys, monkeypatch,
                         {"RANK": "0", "WORLD_SIZE": "2", "SPEAKERLAB_RUN_ID": "partial"})
    assert code == 0, err
    # a world-2 rank_01 exists once rank 1 starts; fake its start so the world-1 rerun meets it
    (out / "rank_01").mkdir()
    r = run_cli(merge_cmd(out, tmp_path / "final"))
    assert r.returncode == 2 and "rank_01: no readable metadata.json" in r.stderr, r.stderr
    (out / "rank_01").rmdir()
    r = run_cli(merge_cmd(out, tmp_path / "final"))
    assert r.returncode == 2 and "rank_01: missing" in r.stderr and "--allow_partial" in r.stderr, r.stderr
    r = run_cli(merge_cmd(out, tmp_path / "final", "--allow_partial"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "final" / "summary.json").read_text())
    assert summary["partial"] is True and any("rank_01: missing" in p for p in summary["problems"])
    assert 0 < summary["total_utterances"] + summary["failures"] < NUM_GOOD + 2

    (out / "rank_01").mkdir()
    code, err = run_main(extract_cmd(root, out, *common_args())[2:], capsys, monkeypatch)
    assert code == 2 and "more ranks (rank_01)" in err, err
    code, err = run_main(extract_cmd(root, out, *common_args(), "--overwrite")[2:], capsys, monkeypatch)
    assert code == 0, err
    assert not (out / "rank_01").exists()
    r = run_cli(merge_cmd(out, tmp_path / "final2"))
    assert r.returncode == 0, r.stderr
    clean, _ = load_utts(base / "clean_final")
    again, _ = load_utts(tmp_path / "final2")
    assert sorted(again) == sorted(clean)
    for key in clean:
        np.testing.assert_allclose(again[key]["embedding"], clean[key]["embedding"], rtol=1e-4, atol=1e-5)


def test_parts_are_atomic_and_temp_files_ignored(tmp_path):
    """A leftover temp file of a flush cut short is never read; parts load back in order."""
    from speakerlab.rundir import RankStore
    store = RankStore(tmp_path, 0)
    store.add("a", np.ones(4, np.float32))
    store.fail({"key": "b", "path": "/x/b.wav", "stage": "decode", "reason": "r"})
    store.flush()
    store.add("c", np.full(4, 2, np.float32), {"seconds": 1.5})
    store.flush()
    (store.parts_dir / ".part_000003.npz.tmp999.npz").write_bytes(b"half a file")
    again = RankStore(tmp_path, 0)
    again.load_parts()
    # only the keys come back into memory (the embeddings stay in the parts)
    assert again.embedded == 2 and again.dim == 4 and again.done_keys() == {"a", "b", "c"}
    again.add("d", np.zeros(4, np.float32))
    again.flush()
    assert sorted(p.name for p in again.parts_dir.glob("part_*.npz")) == \
        ["part_000001.npz", "part_000002.npz", "part_000003.npz"]
    from speakerlab.data import Utterance
    shard = [Utterance(key=k, dataset="d", speaker="s", utterance=k, path=f"/x/{k}.wav") for k in "abcd"]
    written = again.finalize(shard, {}, first_row=10)
    assert written["embedded"] == 3 and written["failed"] == 1
    with np.load(again.dir / "embeddings.npz") as data:  # in scan order, with the seconds recorded
        assert list(data["keys"]) == ["a", "c", "d"] and data["rows"].tolist() == [10, 12, 13]
        assert data["embeddings"][:, 0].tolist() == [1.0, 2.0, 0.0]
        assert np.isnan(data["seconds"][0]) and data["seconds"][1] == 1.5


def test_damaged_part_is_set_aside_and_redone(tmp_path, caplog):
    from speakerlab.rundir import RankStore
    store = RankStore(tmp_path, 0)
    store.add("a", np.ones(4, np.float32))
    store.flush()
    store.add("b", np.ones(4, np.float32))
    store.flush()
    (store.parts_dir / "part_000002.npz").write_bytes(b"PK\x03\x04 not really")
    again = RankStore(tmp_path, 0)
    again.load_parts()
    assert again.done_keys() == {"a"} and "damaged" in caplog.text
    assert (store.parts_dir / "part_000002.npz.damaged").exists()
    again.add("b", np.ones(4, np.float32))
    again.flush()
    assert (store.parts_dir / "part_000003.npz").exists()


def test_tree_changed_since_the_scan_is_refused(setup, tmp_path, capsys, monkeypatch, caplog):
    """Files added to (or removed from) the tree after the scan are not silently left out of a rerun."""
    import shutil
    base, root = setup
    data = tmp_path / "data"
    shutil.copytree(root, data)
    out = tmp_path / "out"
    code, err = run_main(extract_cmd(data, out, *common_args())[2:], capsys, monkeypatch)
    assert code == 0, err
    caplog.clear()
    caplog.set_level("INFO", logger="speakerlab")
    code, err = run_main(extract_cmd(data, out, *common_args())[2:], capsys, monkeypatch)
    assert code == 0 and "the tree still matches" in caplog.text and "already complete" in caplog.text
    write_wav(data / "ds0" / "spk9" / "late.wav", tone(0.7, seed=99))
    (data / "ds1" / "spk1" / "u01.wav").unlink()
    code, err = run_main(extract_cmd(data, out, *common_args())[2:], capsys, monkeypatch)
    assert code == 2
    assert "changed since it was scanned: 1 new or moved (e.g. ds0_spk9_late); 1 gone (e.g. ds1_spk1_u01)" in err
    code, err = run_main(extract_cmd(data, out, *common_args(), "--overwrite")[2:], capsys, monkeypatch)
    assert code == 0, err
    meta = json.loads((out / "rank_00" / "metadata.json").read_text())
    assert meta["counts"]["assigned"] == NUM_GOOD + 2  # 40 good - 1 gone + 1 new, broken + silent


def test_a_resumed_rank_keeps_the_engine_its_run_started_with(tmp_path, monkeypatch):
    """auto may pick another engine on the machine a run resumes on (a requeue onto another CPU type);
    the rank goes on with the one it started with, unless the user named one or asked --overwrite."""
    import dataclasses
    import importlib
    from types import SimpleNamespace
    from speakerlab.extract.options import ExtractOptions, UsageError
    from speakerlab.rundir import RankStore, RunDir
    main_mod = importlib.import_module("speakerlab.extract.main")
    run_dir = RunDir(tmp_path / "run")
    RankStore(run_dir.path, 0).write_metadata({"rank": 0, "complete": False,
                                                "fingerprint": {"backend": "torch", "dtype": "fp32"}})
    built = []

    def fake_build(options, device, streams):
        built.append((options.backend, options.dtype))
        if options.backend == "nope":
            raise UsageError("not here")
        return SimpleNamespace(backend=options.backend, dtype=options.dtype), {}
    monkeypatch.setattr(main_mod, "build_embedder", fake_build)
    here = SimpleNamespace(backend="openvino", dtype="bf16")
    options = ExtractOptions(output_dir=str(run_dir.path), data_root=str(tmp_path))

    kept = main_mod.engine_of_earlier_run(options, run_dir, 0, here, None, 1)
    assert (kept.backend, kept.dtype) == ("torch", "fp32") and built == [("torch", "fp32")]
    for other in (dataclasses.replace(options, overwrite=True), dataclasses.replace(options, dtype="bf16"),
                  dataclasses.replace(options, backend="openvino")):
        assert main_mod.engine_of_earlier_run(other, run_dir, 0, here, None, 1) is here
    assert main_mod.engine_of_earlier_run(options, run_dir, 1, here, None, 1) is here  # no earlier rank 1
    same = SimpleNamespace(backend="torch", dtype="fp32")
    assert main_mod.engine_of_earlier_run(options, run_dir, 0, same, None, 1) is same
    RankStore(run_dir.path, 0).write_metadata({"rank": 0, "fingerprint": {"backend": "nope", "dtype": "fp32"}})
    assert main_mod.engine_of_earlier_run(options, run_dir, 0, here, None, 1) is here  # cannot run it: refused later
    assert len(built) == 2


def test_a_rank_written_before_the_backend_joined_the_fingerprint_still_resumes(tmp_path):
    """Rank metadata of the previous version has no "backend" in its fingerprint: read back, it
    gets the backend its engine record names (torch by default), so the rank resumes and merges."""
    from speakerlab.rundir import RankStore, RunDir
    run_dir = RunDir(tmp_path / "run")
    old = {"rank": 0, "complete": False, "fingerprint": {"dtype": "bf16", "fused": True}}
    RankStore(run_dir.path, 0).write_metadata(old)
    assert RankStore(run_dir.path, 0).read_metadata()["fingerprint"] == {"dtype": "bf16", "fused": True,
                                                                         "backend": "torch"}
    RankStore(run_dir.path, 1).write_metadata(dict(old, rank=1, engine={"backend": "openvino", "dtype": "bf16"}))
    assert run_dir.read_metadata(1)["fingerprint"]["backend"] == "openvino"  # the merge's reader
    assert RankStore(run_dir.path, 1).read_metadata()["fingerprint"]["backend"] == "openvino"
