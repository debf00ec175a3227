"""A real Slurm on this machine: one-node slurm.conf, munged, slurmctld and slurmd started and stopped
by the test itself. Nothing is installed here (.ci/run tries `apt-get install slurm-wlm munge`); without
those programs the tests are skipped and say why."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROOT, extract_cmd, merge_cmd, run_cli, tiny_model_args, tone, write_wav

pytestmark = pytest.mark.slow

PROGRAMS = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "sinfo", "scontrol")


def program(name):
    return shutil.which(name) or next((str(Path(d) / name) for d in ("/usr/sbin", "/sbin")
                                       if (Path(d) / name).is_file()), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=speakerlabtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={dir}/munge.sock
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
PlugStackConfig={dir}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@pytest.fixture(scope="module")
def slurm():
    """Environment (SLURM_CONF) of a one-node Slurm running for this module's tests."""
    missing = [name for name in PROGRAMS if program(name) is None]
    if missing:
        pytest.skip(f"Slurm is not installed here ({', '.join(missing)} not found; "
                    "apt-get install slurm-wlm munge provides them)")
    if os.geteuid() != 0:
        pytest.skip("the test's one-node Slurm runs slurmd as root (SlurmdUser=root); not root here")
    # short path: munge's socket path must fit a sockaddr_un
    folder = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    host = socket.gethostname().split(".")[0]
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    (folder / "plugstack.conf").write_text("")
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = folder / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, dir=folder, cpus=os.cpu_count() or 1,
                                      ctld_port=free_port(), slurmd_port=free_port()))
    env = dict(os.environ, SLURM_CONF=str(conf))
    for name in [n for n in env if n.startswith(("SLURM_", "SBATCH_", "SRUN_")) and n != "SLURM_CONF"]:
        del env[name]  # not a job of some outer Slurm
    started = []

    def start(*cmd):
        log = open(folder / f"{Path(cmd[0]).name}.out", "wb")
        started.append(subprocess.Popen(list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()

    try:
        start(program("munged"), "-F", "--force", f"--socket={folder}/munge.sock", f"--key-file={key}",
              f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log",
              f"--seed-file={folder}/munge.seed")
        deadline = time.time() + 20
        while not (folder / "munge.sock").exists() and time.time() < deadline:
            time.sleep(0.1)
        start(program("slurmctld"), "-D", "-f", str(conf))
        start(program("slurmd"), "-D", "-f", str(conf))
        state = ""
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run([program("sinfo"), "-h", "-o", "%T"], env=env, capture_output=True,
                                   text=True).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        if state != "idle":
            logs = "".join((folder / n).read_text(errors="replace")[-1500:] for n in ("slurmctld.log", "slurmd.log")
                           if (folder / n).is_file())
            pytest.fail(f"the test Slurm did not come up (node state {state!r}):\n{logs}")
        yield env
    finally:
        for proc in reversed(started):  # only what this fixture started
            proc.terminate()
        for proc in reversed(started):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def make_corpus(root: Path):
    for spk, seeds in {"a": (1, 2, 3), "b": (4, 5), "c": (6, 7, 8)}.items():
        for seed in seeds:
            write_wav(root / "ds" / spk / f"u{seed}.wav", tone(0.8 + 0.15 * seed, seed=seed, freq=150 + 40 * seed))


def embeddings(final_dir: Path):
    with np.load(final_dir / "utterance_embeddings.npz", allow_pickle=False) as f:
        return dict(zip(f["keys"].tolist(), f["embeddings"]))


def one_rank_reference(tmp_path, fixtures_dir):
    r = run_cli(extract_cmd(tmp_path / "data", tmp_path / "one", *tiny_model_args(fixtures_dir), "--dtype", "fp32"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(merge_cmd(tmp_path / "one", tmp_path / "one_final"))
    assert r.returncode == 0, r.stderr[-2000:]
    return embeddings(tmp_path / "one_final")


def assert_same(reference, got):
    assert sorted(got) == sorted(reference) and len(got) == 8
    for key, vector in reference.items():
        assert np.allclose(got[key], vector, atol=1e-5), key


def test_srun_two_tasks_equal_one_rank(slurm, tmp_path, fixtures_dir):
    make_corpus(tmp_path / "data")
    reference = one_rank_reference(tmp_path, fixtures_dir)
    cmd = [program("srun"), "-n", "2", "-N", "1", "--overcommit", "--kill-on-bad-exit=1",
           *extract_cmd(tmp_path / "data", tmp_path / "two", *tiny_model_args(fixtures_dir), "--dtype", "fp32")]
    r = run_cli(cmd, env=slurm, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for rank in (0, 1):
        meta = json.loads((tmp_path / "two" / f"rank_{rank:02d}" / "metadata.json").read_text())
        assert meta["complete"] and meta["world_size"] == 2 and meta["counts"]["embedded"] > 0
    r = run_cli(merge_cmd(tmp_path / "two", tmp_path / "two_final"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same(reference, embeddings(tmp_path / "two_final"))


def test_sbatch_example_cpu_mode_through_c10d(slurm, tmp_path, fixtures_dir):
    make_corpus(tmp_path / "data")
    reference = one_rank_reference(tmp_path, fixtures_dir)
    model_path, config_file = tiny_model_args(fixtures_dir)[1::2]
    job_env = dict(slurm, DEVICE="cpu", PROCS_PER_NODE="2", DATA_ROOT=str(tmp_path / "data"),
                   OUTPUT_DIR=str(tmp_path / "job_tmp"), FINAL_OUTPUT_DIR=str(tmp_path / "job_final"),
                   MODEL_PATH=str(model_path), CONFIG_FILE=str(config_file), PYTHON=sys.executable,
                   RDZV_PORT=str(free_port()), EXTRA_ARGS="--dtype fp32")
    log = tmp_path / "job.out"
    # the example as written, its GPU request switched off on the command line (one CPU node here)
    r = run_cli([program("sbatch"), "--wait", "--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={os.cpu_count()}",
                 f"--output={log}", ROOT / "examples" / "slurm_extract.sbatch"], env=job_env, timeout=420)
    output = log.read_text(errors="replace") if log.is_file() else ""
    assert r.returncode == 0, r.stderr[-1000:] + output[-4000:]
    assert "rendezvous at" in output and "1 node(s) x 2 cpu worker(s)" in output, output[-2000:]
    summary = json.loads((tmp_path / "job_final" / "summary.json").read_text())
    assert summary["runs"][0]["world_size"] == 2
    assert_same(reference, embeddings(tmp_path / "job_final"))


def test_sbatch_example_gpu_mode_refuses_without_gpu(slurm, tmp_path):
    """GPU mode on a node without CUDA stops with one line instead of running on CPU with a warning."""
    pytest.importorskip("torch")
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    log = tmp_path / "job.out"
    job_env = dict(slurm, DATA_ROOT=str(tmp_path), PYTHON=sys.executable)
    r = run_cli([program("sbatch"), "--wait", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1",
                 f"--output={log}", ROOT / "examples" / "slurm_extract.sbatch"], env=job_env, timeout=120)
    output = log.read_text(errors="replace")
    assert r.returncode != 0
    assert output.strip().splitlines()[-1].startswith("error: DEVICE=gpu but no CUDA device"), output
