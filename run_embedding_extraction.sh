#!/usr/bin/env bash
# Staged driver: 1 extract (torchrun, one process per GPU; one CPU process without GPUs),
# 2 merge, 3 clean up the intermediate dir once the final files are verified.
# Every variable below can be set in the environment or with a flag: --data_root DIR, --gpus "0 1", ...
set -euo pipefail

DATA_ROOT_GIVEN=${DATA_ROOT:+1}
DATA_ROOT=${DATA_ROOT:-data}
MANIFEST=${MANIFEST:-}                    # instead of a tree: a CSV/TSV/JSONL manifest ...
KALDI_DIR=${KALDI_DIR:-}                  # ... or a Kaldi data dir (DATA_ROOT, if set, is then the base of relative paths)
DATASET=${DATASET:-}                      # dataset name for KALDI_DIR (default: its folder name)
MODEL_PATH=${MODEL_PATH:-}                # empty: the embedded CAM++ zh/en common model
CONFIG_FILE=${CONFIG_FILE:-}              # needed with MODEL_PATH, e.g. conf/eres2netv2.yaml
OUTPUT_DIR=${OUTPUT_DIR:-exp/embeddings_tmp}
FINAL_OUTPUT_DIR=${FINAL_OUTPUT_DIR:-exp/embeddings}
GPUS=${GPUS:-"0 1 2 3"}                   # ids to use when CUDA is present
BATCH_SIZE=${BATCH_SIZE:-128}
NUM_WORKERS=${NUM_WORKERS:--1}
DTYPE=${DTYPE:-auto}
FORMATS=${FORMATS:-pkl,npz}
NNODES=${NNODES:-1}                       # multi-node: same command on every node with NODE_RANK set
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-}
CPU_PROCS=${CPU_PROCS:-1}                 # processes when running on CPU
PYTHON=${PYTHON:-python3}
EXTRA_ARGS=${EXTRA_ARGS:-}                # passed to extract_speaker_embeddings.py verbatim
stage=1
stop_stage=3

usage() {
  sed -n '2,4p' "$0"
  echo "flags: --stage N --stop_stage N --data_root --manifest --kaldi_dir --dataset --model_path --config_file"
  echo "       --output_dir --final_output_dir"
  echo "       --gpus \"0 1\" --batch_size --num_workers --dtype --formats --nnodes --node_rank --master_addr"
  echo "       --master_port --cpu_procs --python --extra_args \"...\""
}

while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage=$2 ;;
    --stop_stage) stop_stage=$2 ;;
    --data_root) DATA_ROOT=$2; DATA_ROOT_GIVEN=1 ;;
    --manifest) MANIFEST=$2 ;;
    --kaldi_dir) KALDI_DIR=$2 ;;
    --dataset) DATASET=$2 ;;
    --model_path) MODEL_PATH=$2 ;;
    --config_file) CONFIG_FILE=$2 ;;
    --output_dir) OUTPUT_DIR=$2 ;;
    --final_output_dir) FINAL_OUTPUT_DIR=$2 ;;
    --gpus) GPUS=$2 ;;
    --batch_size) BATCH_SIZE=$2 ;;
    --num_workers) NUM_WORKERS=$2 ;;
    --dtype) DTYPE=$2 ;;
    --formats) FORMATS=$2 ;;
    --nnodes) NNODES=$2 ;;
    --node_rank) NODE_RANK=$2 ;;
    --master_addr) MASTER_ADDR=$2 ;;
    --master_port) MASTER_PORT=$2 ;;
    --cpu_procs) CPU_PROCS=$2 ;;
    --python) PYTHON=$2 ;;
    --extra_args) EXTRA_ARGS=$2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift 2 || { echo "error: $1 needs a value" >&2; exit 2; }
done

cd "$(dirname "$0")"
die() { echo "error: $*" >&2; exit 1; }

if [ "$stage" -le 1 ] && [ "$stop_stage" -ge 1 ]; then
  input_args=()
  [ -n "$MANIFEST" ] && input_args+=(--manifest "$MANIFEST")
  [ -n "$KALDI_DIR" ] && input_args+=(--kaldi_dir "$KALDI_DIR")
  if [ ${#input_args[@]} -eq 0 ] || [ -n "${DATA_ROOT_GIVEN:-}" ]; then input_args+=(--data_root "$DATA_ROOT"); fi
  [ -n "$DATASET" ] && input_args+=(--dataset "$DATASET")
  echo "== stage 1: extract embeddings (${input_args[*]}) into $OUTPUT_DIR"
  model_args=()
  [ -n "$MODEL_PATH" ] && model_args+=(--model_path "$MODEL_PATH")
  [ -n "$CONFIG_FILE" ] && model_args+=(--config_file "$CONFIG_FILE")
  read -r -a gpu_list <<< "$GPUS"
  has_cuda=$($PYTHON -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
  if [ "$has_cuda" = 1 ]; then
    nproc=${#gpu_list[@]}
    device_args=(--use_gpu --gpu "${gpu_list[@]}")
  else
    echo "no CUDA device: running $CPU_PROCS CPU process(es)"
    nproc=$CPU_PROCS
    device_args=()
  fi
  [ -n "$MASTER_PORT" ] || MASTER_PORT=$($PYTHON -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')
  # shellcheck disable=SC2206
  extra=($EXTRA_ARGS)
  $PYTHON -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$nproc" \
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
      extract_speaker_embeddings.py "${input_args[@]}" --output_dir "$OUTPUT_DIR" \
      "${model_args[@]}" "${device_args[@]}" --batch_size "$BATCH_SIZE" --num_workers "$NUM_WORKERS" \
      --dtype "$DTYPE" "${extra[@]}" \
    || die "stage 1 (extraction) failed; rerun the same command to resume where it stopped"
fi

if [ "$stage" -le 2 ] && [ "$stop_stage" -ge 2 ]; then
  echo "== stage 2: merge $OUTPUT_DIR into $FINAL_OUTPUT_DIR"
  $PYTHON merge_embeddings.py --input_dir "$OUTPUT_DIR" --output_dir "$FINAL_OUTPUT_DIR" --formats "$FORMATS" \
    || die "stage 2 (merge) failed"
fi

if [ "$stage" -le 3 ] && [ "$stop_stage" -ge 3 ]; then
  echo "== stage 3: verify $FINAL_OUTPUT_DIR and remove $OUTPUT_DIR"
  $PYTHON -m speakerlab.cleanup --final_dir "$FINAL_OUTPUT_DIR" --intermediate_dir "$OUTPUT_DIR" \
    || die "stage 3 (clean-up) refused: $OUTPUT_DIR kept"
fi
echo "== done"
