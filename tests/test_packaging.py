"""The package: pyproject.toml agrees with the requirements files and constraints.txt, the model
YAMLs ship inside it, and a built wheel works from another directory without the checkout."""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

SCRIPTS = {"speakerlab-extract", "speakerlab-merge", "speakerlab-score", "speakerlab-report", "speakerlab-manifest"}


def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement_lines(path: Path):
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("-")]


def name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, 1)[0].lower().replace("_", "-")


def test_requirements_files_and_constraints_agree_with_pyproject():
    meta = project()
    runtime = sorted(meta["dependencies"] + meta["optional-dependencies"]["plots"])
    assert sorted(requirement_lines(ROOT / "requirements.txt")) == runtime
    assert requirement_lines(ROOT / "requirements-dev.txt") == meta["optional-dependencies"]["dev"]
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text()
    pinned = {name(line): line.split("==", 1)[1] for line in requirement_lines(ROOT / "constraints.txt")}
    for requirement in runtime + meta["optional-dependencies"]["dev"]:
        assert name(requirement) in pinned, f"{requirement} is not pinned in constraints.txt"
    assert set(meta["scripts"]) == SCRIPTS
    assert requirement_lines(ROOT / "requirements-openvino.txt") == meta["optional-dependencies"]["openvino"]
    for requirement in meta["optional-dependencies"]["openvino"]:
        assert name(requirement) in pinned, f"{requirement} is not pinned in constraints.txt"


def test_configs_ship_in_the_package_and_conf_points_there():
    shipped = sorted(p.name for p in (ROOT / "speakerlab" / "conf").glob("*.yaml"))
    assert len(shipped) == 8 and "campplus.yaml" in shipped and "eres2netv2.yaml" in shipped
    assert (ROOT / "conf").resolve() == (ROOT / "speakerlab" / "conf").resolve()
    from speakerlab import zoo
    assert zoo.DEFAULT_MODEL_CONFIG.parent == ROOT / "speakerlab" / "conf"


def test_known_config_names_resolve_from_any_directory(tmp_path, monkeypatch):
    from speakerlab.config import ConfigError, load_config
    monkeypatch.chdir(tmp_path)
    for given in ("conf/eres2netv2.yaml", "eres2netv2.yaml", "eres2netv2"):
        assert load_config(given).source == str(ROOT / "speakerlab" / "conf" / "eres2netv2.yaml")
    # a file of that name where the user stands wins over the shipped one
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "eres2netv2.yaml").write_text((ROOT / "conf" / "campplus.yaml").read_text())
    assert load_config("conf/eres2netv2.yaml").source == "conf/eres2netv2.yaml"
    with pytest.raises(ConfigError, match=r"cannot read config conf/nope.yaml: .*shipped configs: conf/campplus.yaml"):
        load_config("conf/nope.yaml")
    with pytest.raises(ConfigError, match="cannot read config other/eres2netv2.yaml"):
        load_config("other/eres2netv2.yaml")  # only a bare name or conf/<name> means the shipped one


@pytest.mark.slow
def test_wheel_works_outside_the_checkout(tmp_path):
    """Build the wheel (no network: the build backend of this environment), install it without
    dependencies into a folder, and use it from elsewhere with the checkout out of sight."""
    # a copy of what the wheel is built from: the build writes build/ and *.egg-info beside it
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "speakerlab", source / "speakerlab", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    if r.returncode != 0 and "No module named" in r.stderr and "setuptools" in r.stderr:
        pytest.skip("setuptools is not installed in this environment")
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("speakerlab_extract-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert {f"speakerlab/conf/{p.name}" for p in (ROOT / "speakerlab" / "conf").glob("*.yaml")} <= names
    assert "speakerlab/models/campplus.py" in names and not any(n.startswith("tests/") for n in names)
    assert all(script in entry_points for script in SCRIPTS)

    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    probe = ("import speakerlab, speakerlab.zoo as z, speakerlab.config as c; "
             "print(speakerlab.__file__); print(z.DEFAULT_MODEL_CONFIG.is_file()); "
             "print(c.load_config('conf/eres2netv2.yaml').source)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    where, config_ok, source = r.stdout.split("\n")[:3]
    assert where.startswith(str(target)) and config_ok == "True" and source.startswith(str(target))
    for module in ("report", "score", "manifest"):
        r = subprocess.run([sys.executable, "-m", f"speakerlab.{module}", "-h"], capture_output=True, text=True,
                           cwd=elsewhere, env=env)
        assert r.returncode == 0 and r.stdout.startswith(f"usage: python -m speakerlab.{module}"), r.stderr
    r = subprocess.run([str(target / "bin" / "speakerlab-report"), str(elsewhere)], capture_output=True,
                       text=True, cwd=elsewhere, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "complete.json is missing" in r.stderr
