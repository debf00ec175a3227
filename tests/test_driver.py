"""run_embedding_extraction.sh: stages one at a time, clean-up only after verification, failures."""
import pytest

from tests.helpers import ROOT, run_cli, tone, write_wav

pytestmark = pytest.mark.slow


def driver(tmp_path, fixtures_dir, *flags):
    return run_cli(["bash", ROOT / "run_embedding_extraction.sh", "--data_root", tmp_path / "data",
                    "--output_dir", tmp_path / "tmp", "--final_output_dir", tmp_path / "final",
                    "--model_path", fixtures_dir / "campplus_tiny" / "model.ckpt",
                    "--config_file", fixtures_dir / "campplus_tiny" / "config.yaml",
                    "--cpu_procs", "1", "--extra_args", "--no_progress", *flags],
                   env={"CUDA_VISIBLE_DEVICES": ""})


def test_stages_one_at_a_time(tmp_path, fixtures_dir):
    write_wav(tmp_path / "data" / "ds" / "a" / "u1.wav", tone(1.0, seed=1))
    write_wav(tmp_path / "data" / "ds" / "b" / "u1.wav", tone(1.3, seed=2, freq=300))

    r = driver(tmp_path, fixtures_dir, "--stage", "1", "--stop_stage", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "tmp" / "rank_00" / "metadata.json").is_file() and not (tmp_path / "final").exists()

    # stage 3 before the merge: refuses and keeps the intermediate results
    r = driver(tmp_path, fixtures_dir, "--stage", "3", "--stop_stage", "3")
    assert r.returncode != 0 and "stage 3" in r.stderr and (tmp_path / "tmp").is_dir()

    r = driver(tmp_path, fixtures_dir, "--stage", "2", "--stop_stage", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "final" / "summary.json").is_file() and (tmp_path / "tmp").is_dir()

    r = driver(tmp_path, fixtures_dir, "--stage", "3", "--stop_stage", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (tmp_path / "tmp").exists() and (tmp_path / "final" / "speaker_embeddings.pkl").is_file()


def test_failing_stage_and_bad_flag(tmp_path, fixtures_dir):
    r = driver(tmp_path, fixtures_dir)  # no data: stage 1 fails, later stages do not run
    assert r.returncode != 0 and "stage 1 (extraction) failed" in r.stderr
    assert not (tmp_path / "final").exists()
    r = run_cli(["bash", ROOT / "run_embedding_extraction.sh", "--no_such_flag", "x"])
    assert r.returncode == 2 and "unknown option" in r.stderr
