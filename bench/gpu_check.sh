#!/usr/bin/env bash
# The prepared GPU check (issue 15): one command on a GPU node, under 8 minutes on one H100/H200.
#
#   bash bench/gpu_check.sh [--json OUT.json] [--models campplus,eres2netv2] [--hours H]
#   bash bench/gpu_check.sh --dry_run            # tiny sizes on CPU (CI runs it, via pytest)
#
# Needs python3 with torch (CUDA build), numpy, pyyaml and tqdm. soundfile (with cffi, pycparser) and
# soxr may travel as wheels in .whl/: they are installed into a temporary folder on PYTHONPATH,
# never into the system's Python. The released CAM++ weights are used from .gpu_assets/ when there
# (else a random init). README "Checking a GPU node" says how to carry both.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d /tmp/speakerlab_site.XXXXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -f .gpu_assets/campplus_cn_en_common.pt ]; then
  export SPEAKERLAB_CACHE="$PWD/.gpu_assets"
fi
missing=$("$PY" -c 'import importlib.util as u
print(" ".join(m for m in ("torch", "numpy", "yaml", "tqdm", "soundfile", "soxr") if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
  echo "gpu_check: missing Python packages: $missing (carry them as wheels in .whl/, see README)" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"
