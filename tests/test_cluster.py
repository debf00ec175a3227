"""Several nodes on one machine: two torchrun 'nodes' (--nnodes 2, c10d rendezvous) started by the example
Slurm batch script with stand-in srun/scontrol, and plain srun-style ranks (SLURM_* variables only)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from speakerlab import extract, merge
from tests.helpers import ROOT, tiny_model_args, tone, write_wav

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tree(root, count=7, prefix="u"):
    for i in range(count):
        write_wav(root / "dsA" / f"spk{i % 3}" / f"{prefix}{i}.wav", tone(0.6 + 0.37 * i, seed=i, freq=150 + 20 * i))
    return root


def model_args(fixtures_dir):
    return [str(a) for a in tiny_model_args(fixtures_dir)] + ["--dtype", "fp32", "--num_workers", "0",
                                                             "--no_progress"]


def start(cmd, env):
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "TORCHELASTIC"))}
    full["PYTHONPATH"] = str(ROOT) + os.pathsep + full.get("PYTHONPATH", "")
    full.update(env)
    return subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(procs, timeout=300):
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        outputs.append((proc.returncode, out))
    return outputs


def embeddings(output_dir, final_dir):
    merge.merge([output_dir], final_dir, ["pkl", "npz"])
    with np.load(final_dir / "utterance_embeddings.npz", allow_pickle=False) as data:
        return dict(zip(map(str, data["keys"]), data["embeddings"]))


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def one_rank(tree, tmp_path_factory, fixtures_dir):
    out = tmp_path_factory.mktemp("one")
    assert extract.main(["--data_root", str(tree), "--output_dir", str(out / "tmp"), *model_args(fixtures_dir)]) == 0
    return embeddings(out / "tmp", out / "final")


def rank_dirs(output_dir):
    return sorted(p.name for p in output_dir.glob("rank_*"))


def slurm_env(rank, world=2, job="777", step="0"):
    return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world), "SLURM_LOCALID": "0", "SLURM_JOB_ID": job,
            "SLURM_STEP_ID": step, "SLURM_NTASKS_PER_NODE": "1"}


def srun_like(output_dir, source_args, fixtures_dir, extra=(), env=None, world=2):
    cmd = [sys.executable, "extract_speaker_embeddings.py", *source_args, "--output_dir", output_dir,
           *model_args(fixtures_dir), *extra]
    # rank 1 first: it must wait for rank 0's scan of this run, not take the stale scan.json it finds
    procs = [start(cmd, {**slurm_env(rank, world), **(env or {})}) for rank in reversed(range(world))]
    return list(reversed(finish(procs)))


def test_srun_ranks_without_torchrun(tree, one_rank, tmp_path, fixtures_dir):
    out = tmp_path / "tmp"
    # an earlier run over another tree with 3 ranks left scan.json, a rank_02 and a scan marker behind
    other = make_tree(tmp_path / "other", count=3, prefix="x")
    assert extract.main(["--data_root", str(other), "--output_dir", str(out), *model_args(fixtures_dir)]) == 0
    (out / "rank_02").mkdir()
    (out / "scan.ready.json").write_text(json.dumps({"run_id": "slurm-777.0.0", "error": "", "scan_sha1": "x"}))

    # without --overwrite both ranks stop with rank 0's reason (rank 1 does not wait forever)
    results = srun_like(out, ["--data_root", tree], fixtures_dir, env={"SLURM_STEP_ID": "1"})
    assert [code for code, _ in results] == [2, 2], results
    assert "cannot be resumed" in results[0][1] and "error: rank 0: " in results[1][1]

    # with --overwrite: rank 0 rescans, rank 1 waits for that scan; the stale rank_02 goes
    results = srun_like(out, ["--data_root", tree], fixtures_dir, ["--overwrite"], env={"SLURM_STEP_ID": "2"})
    for code, text in results:
        assert code == 0, text[-3000:]
    assert rank_dirs(out) == ["rank_00", "rank_01"]
    assert_same(embeddings(out, tmp_path / "final"), one_rank)
    marker = json.loads((out / "scan.ready.json").read_text())
    assert marker["run_id"] == "slurm-777.2.0" and marker["error"] == ""


def test_srun_ranks_with_master_addr_form_a_process_group(tree, one_rank, tmp_path, fixtures_dir):
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    results = srun_like(tmp_path / "tmp", ["--data_root", tree], fixtures_dir, env=env)
    for code, text in results:
        assert code == 0, text[-3000:]
    assert not (tmp_path / "tmp" / "scan.ready.json").exists()  # the scan's outcome went by broadcast
    assert_same(embeddings(tmp_path / "tmp", tmp_path / "final"), one_rank)


def test_example_sbatch_script(tree, one_rank, tmp_path, fixtures_dir):
    """examples/slurm_extract.sbatch with stand-ins: srun starts its command once per 'node'."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "while [[ $1 == --* ]]; do shift; done\n"
        "pids=()\n"
        "for node in $(seq 0 $((SLURM_NNODES - 1))); do\n"
        "  SLURM_PROCID=$node SLURM_NODEID=$node SLURM_LOCALID=0 SLURM_NTASKS=$SLURM_NNODES SLURM_STEP_ID=0 \"$@\" &\n"
        "  pids+=($!)\n"
        "done\n"
        "status=0\n"
        "for pid in \"${pids[@]}\"; do wait $pid || status=1; done\n"
        "exit $status\n")
    for name in ("scontrol", "srun"):
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_SUBMIT_DIR": str(ROOT), "DEVICE": "cpu", "PROCS_PER_NODE": "1",
           "RDZV_PORT": str(free_port()), "PYTHON": sys.executable, "DATA_ROOT": str(tree),
           "OUTPUT_DIR": str(tmp_path / "tmp"), "FINAL_OUTPUT_DIR": str(tmp_path / "final"),
           "MODEL_PATH": str(fixtures_dir / "campplus_tiny" / "model.ckpt"),
           "CONFIG_FILE": str(fixtures_dir / "campplus_tiny" / "config.yaml"),
           "EXTRA_ARGS": "--dtype fp32 --num_workers 0"}
    [(code, out)] = finish([start(["bash", ROOT / "examples" / "slurm_extract.sbatch"], env)])
    assert code == 0, out[-4000:]
    assert rank_dirs(tmp_path / "tmp") == ["rank_00", "rank_01"]
    with np.load(tmp_path / "final" / "utterance_embeddings.npz", allow_pickle=False) as data:
        got = dict(zip(map(str, data["keys"]), data["embeddings"]))
    assert_same(got, one_rank)
