#!/usr/bin/env bash
# Staged driver: 1 extract (torchrun, one process per GPU; one plain CPU process without GPUs),
# 2 merge, 3 clean up the intermediate dir once the final files are verified.
# Relative paths are taken from where you run it. Every variable below can also be set in the environment.
set -euo pipefail

prog=$(basename "$0")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

DATA_ROOT_GIVEN=${DATA_ROOT:+1}
DATA_ROOT=${DATA_ROOT:-data}
MANIFEST=${MANIFEST:-}                    # instead of a tree: a CSV/TSV/JSONL manifest ...
KALDI_DIR=${KALDI_DIR:-}                  # ... or a Kaldi data dir (DATA_ROOT, if set, is then the base of relative paths)
DATASET=${DATASET:-}                      # dataset name for KALDI_DIR (default: its folder name)
MODEL_PATH=${MODEL_PATH:-}                # empty: the embedded CAM++ zh/en common model
CONFIG_FILE=${CONFIG_FILE:-}              # needed with MODEL_PATH, e.g. conf/eres2netv2.yaml
OUTPUT_DIR=${OUTPUT_DIR:-exp/embeddings_tmp}
FINAL_OUTPUT_DIR=${FINAL_OUTPUT_DIR:-exp/embeddings}
GPUS=${GPUS:-all}                         # ids to use when CUDA is present; all = every visible GPU
BATCH_SIZE=${BATCH_SIZE:-128}
NUM_WORKERS=${NUM_WORKERS:--1}
DTYPE=${DTYPE:-auto}
FORMATS=${FORMATS:-pkl,npz}
NNODES=${NNODES:-1}                       # multi-node: the same command on every node, each with its NODE_RANK
NODE_RANK=${NODE_RANK:-}                  # nnodes > 1: required (or SLURM_NODEID)
MASTER_ADDR=${MASTER_ADDR:-}              # nnodes > 1: required (or the first node of SLURM_JOB_NODELIST)
MASTER_PORT=${MASTER_PORT:-}              # nnodes > 1: required (or derived from SLURM_JOB_ID)
CPU_PROCS=${CPU_PROCS:-1}                 # processes when running on CPU
PYTHON=${PYTHON:-python3}
EXTRA_ARGS=${EXTRA_ARGS:-}                # passed to the extraction worker verbatim
stage=1
stop_stage=3

short_usage="usage: $prog [--stage N] [--stop_stage N] [--data_root DIR | --manifest FILE | --kaldi_dir DIR] [--final_output_dir DIR] [--flag VALUE ...] (-h lists every flag)"

usage() {
  cat <<EOF
usage: $prog [--flag VALUE ...]
Stages: 1 extract (torchrun, one process per GPU; one plain CPU process without GPUs), 2 merge,
3 remove the intermediate dir once the final files are verified. Relative paths are taken from the
current directory. Each flag can also be given as the environment variable in capitals (DATA_ROOT=...).

  --stage N              first stage to run (default 1)
  --stop_stage N         last stage to run (default 3)
  --data_root DIR        data_root/<dataset>/<speaker>/<utt>.<wav|flac|ogg|mp3> (default: data); with
                         --manifest or --kaldi_dir: the folder relative audio paths start from
  --manifest FILE        CSV/TSV/JSONL/JSON list instead of a tree (path, speaker, dataset [, utterance, start, end])
  --kaldi_dir DIR        Kaldi data dir instead of a tree (wav.scp, utt2spk [, segments])
  --dataset NAME         dataset name for --kaldi_dir, or for manifest rows without one
  --model_path FILE      checkpoint (default: the embedded CAM++ zh/en common model)
  --config_file FILE     model YAML, needed with --model_path (conf/eres2netv2.yaml works from anywhere)
  --output_dir DIR       intermediate per-rank results (default: exp/embeddings_tmp)
  --final_output_dir DIR final files (default: exp/embeddings)
  --gpus "0 1 ..."       GPU ids to use when CUDA is present, one process each (default: all, every visible GPU)
  --batch_size N         most utterances per batch (default 128)
  --num_workers N        decode processes per rank, -1 = auto (default -1)
  --dtype D              auto|fp32|bf16|fp16 (default auto)
  --formats LIST         final formats, from pkl,npz,kaldi (default pkl,npz)
  --cpu_procs N          processes when there is no CUDA (default 1)
  --nnodes N             nodes; with N > 1 run the same command on every node (default 1)
  --node_rank K          this node's rank, 0..N-1 (nnodes > 1; default: SLURM_NODEID)
  --master_addr HOST     node 0's address (nnodes > 1; default under Slurm: the job's first node)
  --master_port PORT     a free port on node 0 (nnodes > 1; default under Slurm: 20000 + job id % 20000)
  --python EXE           python to run the stages with (default python3)
  --extra_args "..."     more flags for the extraction worker, e.g. "--strict --channels mean"
                         (extract_speaker_embeddings.py -h lists them)
  -h, --help             this help
EOF
}

# One line, exit 2: the shape of every argument error of this project.
usage_error() { echo "error: $*; $short_usage" >&2; exit 2; }
need_int() { [[ $2 =~ ^[0-9]+$ ]] || usage_error "$1 needs a whole number, not '$2'"; }

while [ $# -gt 0 ]; do
  opt=$1
  case "$opt" in
    -h|--help) usage; exit 0 ;;
    --stage|--stop_stage|--data_root|--manifest|--kaldi_dir|--dataset|--model_path|--config_file|--output_dir|\
    --final_output_dir|--gpus|--batch_size|--num_workers|--dtype|--formats|--nnodes|--node_rank|--master_addr|\
    --master_port|--cpu_procs|--python|--extra_args) ;;
    *) usage_error "unknown option $opt" ;;
  esac
  [ $# -ge 2 ] || usage_error "$opt needs a value"
  value=$2
  case "$opt" in
    --stage) need_int "$opt" "$value"; stage=$value ;;
    --stop_stage) need_int "$opt" "$value"; stop_stage=$value ;;
    --data_root) DATA_ROOT=$value; DATA_ROOT_GIVEN=1 ;;
    --manifest) MANIFEST=$value ;;
    --kaldi_dir) KALDI_DIR=$value ;;
    --dataset) DATASET=$value ;;
    --model_path) MODEL_PATH=$value ;;
    --config_file) CONFIG_FILE=$value ;;
    --output_dir) OUTPUT_DIR=$value ;;
    --final_output_dir) FINAL_OUTPUT_DIR=$value ;;
    --gpus) GPUS=$value ;;
    --batch_size) BATCH_SIZE=$value ;;
    --num_workers) NUM_WORKERS=$value ;;
    --dtype) DTYPE=$value ;;
    --formats) FORMATS=$value ;;
    --nnodes) NNODES=$value ;;
    --node_rank) NODE_RANK=$value ;;
    --master_addr) MASTER_ADDR=$value ;;
    --master_port) MASTER_PORT=$value ;;
    --cpu_procs) CPU_PROCS=$value ;;
    --python) PYTHON=$value ;;
    --extra_args) EXTRA_ARGS=$value ;;
  esac
  shift 2
done
for pair in "--nnodes:$NNODES" "--cpu_procs:$CPU_PROCS"; do need_int "${pair%%:*}" "${pair#*:}"; done
[ -z "$NODE_RANK" ] || need_int --node_rank "$NODE_RANK"
[ -z "$MASTER_PORT" ] || need_int --master_port "$MASTER_PORT"

# The stages run where the user stands (relative paths are theirs); the code is this checkout's,
# or the installed speakerlab when the driver is used outside a checkout.
if [ -f "$here/speakerlab/__init__.py" ]; then export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"; fi
EXTRACT=("$here/extract_speaker_embeddings.py")
MERGE=("$here/merge_embeddings.py")
[ -f "${EXTRACT[0]}" ] || EXTRACT=(-c 'from speakerlab.cli import extract; extract()')
[ -f "${MERGE[0]}" ] || MERGE=(-c 'from speakerlab.cli import merge; merge()')

runs() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }
started=$(date +%s.%N)

rdzv=()
if [ "$NNODES" -gt 1 ]; then
  # Every node must meet at one address and port: never a guess (127.0.0.1, a random port per node).
  if [ -z "$MASTER_ADDR" ] && [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null 2>&1; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1) || MASTER_ADDR=
  fi
  if [ -z "$MASTER_PORT" ] && [ -n "${SLURM_JOB_ID:-}" ]; then MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000)); fi
  [ -n "$NODE_RANK" ] || NODE_RANK=${SLURM_NODEID:-}
  [ -n "$MASTER_ADDR" ] || usage_error "--nnodes $NNODES needs --master_addr HOST (node 0's address; under Slurm it is the job's first node)"
  [ -n "$MASTER_PORT" ] || usage_error "--nnodes $NNODES needs --master_port PORT (the same free port on every node; under Slurm derived from SLURM_JOB_ID)"
  [ -n "$NODE_RANK" ] || usage_error "--nnodes $NNODES needs --node_rank K (0..$((NNODES - 1)), one per node; under Slurm SLURM_NODEID)"
  [ "$NODE_RANK" -lt "$NNODES" ] || usage_error "--node_rank $NODE_RANK is not below --nnodes $NNODES"
  rdzv=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
fi

if runs 1; then
  input_args=()
  [ -n "$MANIFEST" ] && input_args+=(--manifest "$MANIFEST")
  [ -n "$KALDI_DIR" ] && input_args+=(--kaldi_dir "$KALDI_DIR")
  if [ ${#input_args[@]} -eq 0 ] || [ -n "${DATA_ROOT_GIVEN:-}" ]; then input_args+=(--data_root "$DATA_ROOT"); fi
  [ -n "$DATASET" ] && input_args+=(--dataset "$DATASET")
  model_args=()
  [ -n "$MODEL_PATH" ] && model_args+=(--model_path "$MODEL_PATH")
  [ -n "$CONFIG_FILE" ] && model_args+=(--config_file "$CONFIG_FILE")

  read -r -a gpu_list <<< "$GPUS"
  visible_gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
  has_cuda=$([ "${visible_gpus:-0}" -gt 0 ] && echo 1 || echo 0)
  if [ "$has_cuda" = 1 ] && [ "$GPUS" = all ]; then
    nproc=$visible_gpus            # rank k takes the k-th visible GPU
    device_args=(--use_gpu)
  elif [ "$has_cuda" = 1 ]; then
    nproc=${#gpu_list[@]}
    device_args=(--use_gpu --gpu "${gpu_list[@]}")
  else
    nproc=$CPU_PROCS
    device_args=()
  fi
  # shellcheck disable=SC2206
  extra=($EXTRA_ARGS)
  worker_args=("${input_args[@]}" --output_dir "$OUTPUT_DIR" "${model_args[@]}" "${device_args[@]}"
               --batch_size "$BATCH_SIZE" --num_workers "$NUM_WORKERS" --dtype "$DTYPE" "${extra[@]}")

  # The arguments, checked in one plain process before torchrun starts: a bad one ends in the
  # worker's own one-line error and exit 2.
  if runs 2; then "$PYTHON" -m speakerlab.driver writable -- --final_output_dir "$FINAL_OUTPUT_DIR"; fi
  "$PYTHON" "${EXTRACT[@]}" "${worker_args[@]}" --check_only

  where=$([ "$has_cuda" = 1 ] && echo "$nproc GPU process(es)" || echo "$nproc CPU process(es)")
  echo "== stage 1: extract embeddings (${input_args[*]}) into $OUTPUT_DIR, $where$([ "$NNODES" -gt 1 ] && echo " on node $NODE_RANK of $NNODES")"
  status=0
  if [ "$nproc" -eq 1 ] && [ "$NNODES" -eq 1 ]; then
    "$PYTHON" "${EXTRACT[@]}" "${worker_args[@]}" || status=$?
  else
    if [ "$NNODES" -eq 1 ]; then rdzv=(--standalone); fi
    launch=("$here/extract_speaker_embeddings.py")
    [ -f "${launch[0]}" ] || launch=(--no-python speakerlab-extract)   # outside a checkout: the console script
    # torchrun's banner and failure report are kept out of the way; a failure ends with the worker's line.
    "$PYTHON" -m speakerlab.driver torchrun "${rdzv[@]}" --nproc_per_node "$nproc" "${launch[@]}" \
        "${worker_args[@]}" || status=$?
  fi
  if [ "$status" -ne 0 ]; then
    # The worker's own message is the last line above; a rerun of the same command resumes.
    exit "$status"
  fi
fi

if [ "$NNODES" -gt 1 ] && [ "$NODE_RANK" != 0 ]; then
  # torchrun returned once every node's workers finished; node 0 merges and cleans up, once
  echo "== node $NODE_RANK: done; node 0 runs the later stages"
  exit 0
fi

if runs 2; then
  echo "== stage 2: merge $OUTPUT_DIR into $FINAL_OUTPUT_DIR"
  # a failure ends with the merge's own message and exit status
  "$PYTHON" "${MERGE[@]}" --input_dir "$OUTPUT_DIR" --output_dir "$FINAL_OUTPUT_DIR" --formats "$FORMATS"
fi

if runs 3; then
  echo "== stage 3: verify $FINAL_OUTPUT_DIR and remove $OUTPUT_DIR"
  # a refusal ends with the clean-up's own reason; the intermediate dir is kept
  "$PYTHON" -m speakerlab.cleanup --final_dir "$FINAL_OUTPUT_DIR" --intermediate_dir "$OUTPUT_DIR"
fi

if [ -f "$FINAL_OUTPUT_DIR/summary.json" ] && { runs 2 || runs 3; }; then
  # x real time only when this invocation extracted (otherwise the wall time is a merge's)
  since=(); if runs 1; then since=(--since "$started"); fi
  "$PYTHON" -m speakerlab.driver summary "$FINAL_OUTPUT_DIR" "${since[@]}"
else
  echo "== done"
fi
