"""bench/gpu_check.py's dry run (tiny sizes, CPU): the prepared GPU check runs end to end in CI, so it
cannot rot before a GPU is lent. About 20 s on an idle 2-core machine, so not marked slow."""
import json
import os
import subprocess
import sys

from tests.helpers import ROOT


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry_run", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "all checks passed" in proc.stdout
    report = json.loads(out.read_text())
    assert [m["model"] for m in report["models"]] == ["campplus", "eres2netv2"]
    for model in report["models"]:
        assert model["failed"] == 0 and model["embedded"] > 0
        assert model["pipeline_x_real_time"] > 0 and model["ceiling_x_real_time"] > 0 and model["ratio"] > 0
        assert model["timing"]["steady_audio_s"] > 0
        assert model["ceiling"]["batches"] >= 2 and model["min_cosine_to_fp32"] >= 0.999
    assert report["two_ranks"]["passed"] and report["two_ranks"]["ranks"] == 2
    assert report["oom"]["splits"] == 1 and report["oom"]["embedded"] == report["oom"]["batch"]
