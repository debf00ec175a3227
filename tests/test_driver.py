"""run_embedding_extraction.sh: stages one at a time, paths from where the user stands, arguments
checked before torchrun (one line, exit 2), the worker's own error last, multi-node rendezvous."""
import json
import os
import random
import re
import socket
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROOT, run_cli, tone, write_wav

pytestmark = pytest.mark.slow

DRIVER = ROOT / "run_embedding_extraction.sh"


def tiny(fixtures_dir):
    return ["--model_path", fixtures_dir / "campplus_tiny" / "model.ckpt",
            "--config_file", fixtures_dir / "campplus_tiny" / "config.yaml"]


def driver(tmp_path, fixtures_dir, *flags, cwd=ROOT, env=None):
    return run_cli(["bash", DRIVER, "--data_root", tmp_path / "data",
                    "--output_dir", tmp_path / "tmp", "--final_output_dir", tmp_path / "final",
                    *tiny(fixtures_dir), "--cpu_procs", "1", "--extra_args", "--no_progress", *flags],
                   env={"CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp_path), **(env or {})}, cwd=cwd)


def two_speakers(root: Path):
    write_wav(root / "ds" / "a" / "u1.wav", tone(1.0, seed=1))
    write_wav(root / "ds" / "b" / "u1.wav", tone(1.3, seed=2, freq=300))


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_one_line_error(r, *words, status=2):
    assert r.returncode == status, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    line = last_line(r.stderr)
    assert line.startswith("error: "), r.stderr[-2000:]
    for word in words:
        assert str(word) in line, (word, line)
    for noise in ("Traceback", "ChildFailedError", "torch.distributed", "unbound variable"):
        assert noise not in r.stderr, r.stderr[-2000:]
    return line


def test_stages_one_at_a_time(tmp_path, fixtures_dir):
    two_speakers(tmp_path / "data")

    r = driver(tmp_path, fixtures_dir, "--stage", "1", "--stop_stage", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "tmp" / "rank_00" / "metadata.json").is_file() and not (tmp_path / "final").exists()

    # stage 3 before the merge: refuses with the clean-up's own reason and keeps the intermediate results
    r = driver(tmp_path, fixtures_dir, "--stage", "3", "--stop_stage", "3")
    assert r.returncode != 0 and last_line(r.stderr).startswith("error: ") and (tmp_path / "tmp").is_dir()

    r = driver(tmp_path, fixtures_dir, "--stage", "2", "--stop_stage", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "final" / "summary.json").is_file() and (tmp_path / "tmp").is_dir()

    r = driver(tmp_path, fixtures_dir, "--stage", "3", "--stop_stage", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (tmp_path / "tmp").exists() and (tmp_path / "final" / "speaker_embeddings.pkl").is_file()


def test_relative_paths_are_the_users_and_a_summary_line_ends_the_run(tmp_path, fixtures_dir):
    work = tmp_path / "work"
    two_speakers(work / "corpus")
    model = tiny(fixtures_dir)
    r = run_cli(["bash", DRIVER, "--data_root", "corpus", "--output_dir", "tmp", "--final_output_dir", "out",
                 *model, "--extra_args", "--no_progress"], env={"CUDA_VISIBLE_DEVICES": ""}, cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (work / "out" / "summary.json").is_file() and not (work / "tmp").exists()
    for name in ("corpus", "out", "tmp"):
        assert not (ROOT / name).exists()  # nothing read or written in the checkout
    summary = json.loads((work / "out" / "summary.json").read_text())
    assert summary["runs"][0]["data_root"] == str(work / "corpus")
    line = last_line(r.stdout)
    match = re.fullmatch(r"== done: 2 utterances embedded, 0 failed, 0\.00 h of audio \(2\.3 s\), "
                         r"([\d.]+) s wall time \(([\d.]+)x real time\); final files in (.+)", line)
    assert match, line
    wall, speed = float(match.group(1)), float(match.group(2))
    assert match.group(3) == str(work / "out") and 0 < wall < 600
    assert speed == pytest.approx(2.3 / wall, rel=0.1, abs=0.06)


@pytest.mark.parametrize("case", ["data_root", "manifest", "model", "config", "output_dir", "final_output_dir"])
def test_bad_argument_is_one_line_before_torchrun(tmp_path, fixtures_dir, case):
    two_speakers(tmp_path / "data")
    (tmp_path / "a_file").write_text("x")
    flags = {
        "data_root": (["--data_root", tmp_path / "absent"], [tmp_path / "absent", "not a directory"]),
        "manifest": (["--manifest", tmp_path / "absent.csv"], [tmp_path / "absent.csv", "not a file"]),
        "model": (["--model_path", tmp_path / "absent.ckpt"], [tmp_path / "absent.ckpt"]),
        "config": (["--config_file", tmp_path / "absent.yaml"], [tmp_path / "absent.yaml", "cannot read config"]),
        "output_dir": (["--output_dir", tmp_path / "a_file" / "tmp"], ["--output_dir", tmp_path / "a_file"]),
        "final_output_dir": (["--final_output_dir", tmp_path / "a_file" / "final"],
                             ["--final_output_dir", tmp_path / "a_file"]),
    }[case]
    # two CPU processes: torchrun would be used if the check let it start
    r = driver(tmp_path, fixtures_dir, "--cpu_procs", "2", *flags[0])
    assert_one_line_error(r, *flags[1])
    assert "== stage 1" not in r.stdout  # stopped before torchrun started
    assert not (tmp_path / "tmp").exists() and not (tmp_path / "final").exists()


@pytest.mark.parametrize("procs", ["1", "2"])
def test_worker_failure_ends_with_the_workers_line_and_status(tmp_path, fixtures_dir, procs):
    (tmp_path / "data" / "ds").mkdir(parents=True)  # passes the check, but holds no audio
    r = driver(tmp_path, fixtures_dir, "--cpu_procs", procs)
    line = assert_one_line_error(r, "no audio files found under", tmp_path / "data")
    assert "== stage 1" in r.stdout and not (tmp_path / "final").exists()
    if procs == "2":  # through torchrun: its own report is kept aside, in a file the last lines name
        report = re.search(r"torchrun's own report of the failure: (\S+)\)", r.stderr)
        assert report and "ChildFailedError" in Path(report.group(1)).read_text()
        assert r.stderr.strip().splitlines()[-1] == line


def test_usage_errors(tmp_path):
    for args, words in [(["--stage"], "--stage needs a value"),
                        (["--stage", "1", "--stop_stage"], "--stop_stage needs a value"),
                        (["--stage", "x"], "--stage needs a whole number"),
                        (["--no_such_flag", "x"], "unknown option --no_such_flag")]:
        r = run_cli(["bash", DRIVER, *args], cwd=tmp_path)
        assert r.returncode == 2 and r.stdout == "", (args, r.stdout, r.stderr)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {words}") and "usage:" in lines[0], r.stderr


def test_help_lists_every_flag(tmp_path):
    r = run_cli(["bash", DRIVER, "-h"], cwd=tmp_path)
    assert r.returncode == 0
    text = DRIVER.read_text()
    parsed = set(re.findall(r"^\s*(--[a-z_]+)\) ", text, flags=re.M))
    assert len(parsed) >= 22
    listed = set(re.findall(r"^  (--[a-z_]+)", r.stdout, flags=re.M))
    assert parsed == listed, (parsed ^ listed)


# --- several nodes: one address and port for all, never a guess --------------------------------
@pytest.mark.parametrize("flags, env, words", [
    (["--nnodes", "2"], {}, "--master_addr"),
    (["--nnodes", "2", "--master_addr", "head"], {}, "--master_port"),
    (["--nnodes", "2", "--master_addr", "head", "--master_port", "29511"], {}, "--node_rank"),
    (["--nnodes", "2", "--master_addr", "head", "--master_port", "29511", "--node_rank", "2"], {}, "not below"),
    # under Slurm, but scontrol cannot name the nodes (and no port): still one line, no guess
    (["--nnodes", "2"], {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODEID": "0"}, "--master_addr"),
    (["--nnodes", "2", "--master_addr", "head"], {"SLURM_NODEID": "1"}, "--master_port"),
])
def test_multi_node_needs_one_address_and_port(tmp_path, fixtures_dir, flags, env, words):
    two_speakers(tmp_path / "data")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'scontrol: error: no controller' >&2\nexit 1\n")
    (bin_dir / "scontrol").chmod(0o755)
    r = driver(tmp_path, fixtures_dir, *flags, env={**env, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert_one_line_error(r, words)
    assert "== stage 1" not in r.stdout


def free_job_port():
    """A SLURM_JOB_ID whose derived port (20000 + id % 20000) is free now."""
    for _ in range(50):
        job = random.randrange(1, 1_000_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job % 20000))
            except OSError:
                continue
        return job
    pytest.skip("no free port in 20000-39999")


def test_two_nodes_meet_at_the_address_and_port_derived_from_slurm(tmp_path, fixtures_dir):
    """Two 'nodes' on this machine, each a driver as srun would start it: the head node from
    SLURM_JOB_NODELIST through scontrol, the port from SLURM_JOB_ID, the node rank from SLURM_NODEID.
    Node 0 merges once both are done; the result equals one rank."""
    import subprocess
    two_speakers(tmp_path / "data")
    write_wav(tmp_path / "data" / "ds" / "c" / "u1.wav", tone(0.9, seed=3, freq=180))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # scontrol as Slurm's would answer for a two-node job (both nodes are this machine here)
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "localhost\\nlocalhost\\n"\n')
    (bin_dir / "scontrol").chmod(0o755)
    job = free_job_port()
    base = {"CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp_path), "SLURM_JOB_NODELIST": "node[1-2]",
            "SLURM_JOB_ID": str(job), "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT)}
    procs = []
    for node in (0, 1):
        cmd = ["bash", str(DRIVER), "--data_root", str(tmp_path / "data"), "--output_dir", str(tmp_path / "tmp"),
               "--final_output_dir", str(tmp_path / "final"), *map(str, tiny(fixtures_dir)), "--nnodes", "2",
               "--dtype", "fp32", "--extra_args", "--no_progress"]
        procs.append(subprocess.Popen(cmd, env={**os.environ, **base, "SLURM_NODEID": str(node)},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-1500:] + err[-3000:]
    assert "node 0 runs the later stages" in outs[1][0] and "== stage 2" not in outs[1][0]
    assert last_line(outs[0][0]).startswith("== done: 3 utterances embedded, 0 failed")
    summary = json.loads((tmp_path / "final" / "summary.json").read_text())
    assert summary["runs"][0]["world_size"] == 2 and summary["total_utterances"] == 3

    r = run_cli(["bash", DRIVER, "--data_root", tmp_path / "data", "--output_dir", tmp_path / "one",
                 "--final_output_dir", tmp_path / "one_final", *tiny(fixtures_dir), "--dtype", "fp32",
                 "--extra_args", "--no_progress"], env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    with np.load(tmp_path / "final" / "utterance_embeddings.npz") as two, \
            np.load(tmp_path / "one_final" / "utterance_embeddings.npz") as one:
        assert list(two["keys"]) == list(one["keys"])
        assert np.allclose(two["embeddings"], one["embeddings"], atol=1e-5)
