"""Hostile-user cases found in review (issues 11, 13, 15): each reproduces a break seen with the real
commands, on tiny trees."""
import json
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
