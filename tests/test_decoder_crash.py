"""A decoder that kills its process (a codec segfault, the OOM killer) costs one file, not the rank."""
import json
import os
import signal

import numpy as np
import pytest

from tests.helpers import ROOT, extract_cmd, micro_model, run_cli, tone, write_wav

# Loaded at interpreter start (and so in every decode worker): files whose name contains
# $SPEAKERLAB_TEST_CRASH kill the process that decodes them with $SPEAKERLAB_TEST_SIGNAL.
HOOK = '''
import os, signal
if os.environ.get("SPEAKERLAB_TEST_CRASH"):
    import speakerlab.extract.loader as _extract
    _load = _extract.load_audio
    def _crashing_load(path, *args, **kwargs):
        if os.environ["SPEAKERLAB_TEST_CRASH"] in os.path.basename(str(path)):
            import time
            time.sleep(float(os.environ.get("SPEAKERLAB_TEST_CRASH_DELAY", "0")))
            os.kill(os.getpid(), int(os.environ["SPEAKERLAB_TEST_SIGNAL"]))
        return _load(path, *args, **kwargs)
    _extract.load_audio = _crashing_load
if os.environ.get("SPEAKERLAB_TEST_SLOW_MODEL"):  # the main thread is inside the model when a worker dies
    import time
    import speakerlab.embedder as _embedder
    _embed = _embedder.Embedder.embed
    def _slow_embed(self, *args, **kwargs):
        time.sleep(float(os.environ["SPEAKERLAB_TEST_SLOW_MODEL"]))
        return _embed(self, *args, **kwargs)
    _embedder.Embedder.embed = _slow_embed
if os.environ.get("SPEAKERLAB_TEST_SLOW_LOAD"):  # the model loads when a worker dies (started early)
    import time
    import speakerlab.models as _models
    _load_model = _models.load_model
    def _slow_load_model(*args, **kwargs):
        time.sleep(float(os.environ["SPEAKERLAB_TEST_SLOW_LOAD"]))
        return _load_model(*args, **kwargs)
    _models.load_model = _slow_load_model
    import sys as _sys  # (already imported by the hook above: its binding too)
    if "speakerlab.extract.main" in _sys.modules:
        _sys.modules["speakerlab.extract.main"].load_model = _slow_load_model
if os.environ.get("SPEAKERLAB_TEST_SLOW_COMPILE"):  # the main thread is compiling when a worker dies
    import time
    import speakerlab.backends as _backends
    _compile = _backends.OpenVINOModel.compile
    def _slow_compile(self):
        time.sleep(float(os.environ["SPEAKERLAB_TEST_SLOW_COMPILE"]))
        return _compile(self)
    _backends.OpenVINOModel.compile = _slow_compile
'''


@pytest.mark.parametrize("sig, extra", [
    (signal.SIGSEGV, []),
    (signal.SIGKILL, []),
    # one stream, one file per batch, a slow model: the worker's death is reported (from torch's
    # SIGCHLD handler) while the main thread is in the model; it must not fail the file being embedded
    (signal.SIGSEGV, ["--streams", "1", "--batch_frames", "1", "SLOW"]),
    # the engine compiles after the workers fork: a worker dying then is a decoder crash, not a
    # compile failure (nor a reason that tells the user to drop OpenVINO)
    pytest.param(signal.SIGSEGV, ["--backend", "openvino", "--dtype", "fp32", "SLOWCOMPILE"],
                 marks=pytest.mark.skipif(__import__("speakerlab.backends", fromlist=["x"]).openvino_version() is None,
                                          reason="OpenVINO not installed")),
    # a fresh rank's workers start before the model loads: a worker dying then must not break the
    # load (nor a metadata write); it is reported once the shard's embedding starts
    (signal.SIGSEGV, ["SLOWLOAD"]),
], ids=["segfault", "killed", "during-model", "during-compile", "during-model-load"])
def test_decoder_crash_fails_one_file_and_the_run_goes_on(tmp_path, sig, extra):
    data = tmp_path / "data"
    names = ["a1", "a2", "boom1", "a3", "a4", "boom2", "a5"]
    for i, name in enumerate(names):
        write_wav(data / "ds" / f"spk{i % 2}" / f"{name}.wav", tone(0.5 + 0.1 * i, seed=i))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    env = {"PYTHONPATH": f"{hook}{os.pathsep}{ROOT}", "SPEAKERLAB_TEST_CRASH": "boom",
           "SPEAKERLAB_TEST_SIGNAL": str(int(sig))}
    if "SLOW" in extra:
        env["SPEAKERLAB_TEST_SLOW_MODEL"] = "1.2"
        env["SPEAKERLAB_TEST_CRASH_DELAY"] = "0.4"
        extra = [a for a in extra if a != "SLOW"]
    if "SLOWLOAD" in extra:
        env["SPEAKERLAB_TEST_SLOW_LOAD"] = "1.5"
        extra = [a for a in extra if a != "SLOWLOAD"]
    if "SLOWCOMPILE" in extra:
        env["SPEAKERLAB_TEST_SLOW_COMPILE"] = "1.5"
        extra = [a for a in extra if a != "SLOWCOMPILE"]
    out = tmp_path / "out"
    model = micro_model(tmp_path / "model")
    r = run_cli(extract_cmd(data, out, *model, "--num_workers", "2", "--batch_frames", "60", *extra), env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("the decoder crashed on") == 2
    meta = json.loads((out / "rank_00" / "metadata.json").read_text())
    assert meta["complete"] and meta["counts"] == {"assigned": 7, "embedded": 5, "failed": 2}
    failed = {f["key"]: f for f in meta["failures"]}
    assert set(failed) == {"ds_spk0_boom1", "ds_spk1_boom2"}
    for record in failed.values():
        assert record["stage"] == "decode" and "the decoder crashed on this file" in record["reason"]
        assert "backend" not in record["reason"] and "compile" not in record["reason"], record["reason"]
        assert "boom" in record["path"]
    with np.load(out / "rank_00" / "embeddings.npz") as f:
        assert sorted(f["keys"]) == sorted(f"ds_spk{i % 2}_{n}" for i, n in enumerate(names) if "boom" not in n)
    assert not (out / "rank_00" / "decoding").exists()
    # the same run again: complete, nothing redone, the crashing files not touched again
    again = run_cli(extract_cmd(data, out, *model, "--num_workers", "2"), env=env)
    assert again.returncode == 0 and "already complete" in again.stderr


def test_unidentifiable_worker_death_still_stops_the_rank(tmp_path):
    """Without decode workers (--num_workers 0) nothing can name the file: the rank stops, as before."""
    data = tmp_path / "data"
    write_wav(data / "ds" / "spk" / "boom.wav", tone(0.5))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    env = {"PYTHONPATH": f"{hook}{os.pathsep}{ROOT}", "SPEAKERLAB_TEST_CRASH": "boom",
           "SPEAKERLAB_TEST_SIGNAL": str(int(signal.SIGKILL))}
    r = run_cli(extract_cmd(data, tmp_path / "out", *micro_model(tmp_path / "model"), "--num_workers", "0"),
                env=env)
    assert r.returncode == -signal.SIGKILL


def test_broken_handover_is_read_as_the_dead_worker():
    """A worker killed while handing a batch over (shared memory sent as an fd) surfaces in the rank as
    ConnectionResetError before torch's SIGCHLD handler speaks: it is still read as that worker's
    death, so its file fails and the rank goes on (seen in CI as a flaky [killed] case)."""
    import multiprocessing as mp
    import signal as sig
    import time

    from torch.utils.data._utils import signal_handling

    from speakerlab.extract.loader import dead_workers, death_behind

    child = mp.get_context("fork").Process(target=lambda: os.kill(os.getpid(), sig.SIGKILL))
    child.start()
    deadline = time.monotonic() + 10
    while os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    key = 987654
    signal_handling._set_worker_pids(key, (child.pid,))
    try:
        death = death_behind(ConnectionResetError(104, "Connection reset by peer"))
        assert isinstance(death, RuntimeError)
        pids, how = dead_workers(death)
        assert pids == [child.pid] and "Killed" in how
    finally:
        signal_handling._remove_worker_pids(key)
        child.join()
    # no worker died: the error is not a decoder crash
    assert death_behind(ConnectionResetError(104, "reset"), patience=0.1) is None
