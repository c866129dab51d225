#!/usr/bin/env bash
# The whole GPU benchmark in one command of under 8 minutes on one H100/H200 (bf16, batch 256,
# 224 px): the data path (each decoder per CPU core, nvJPEG on the GPU, the real nvjpeg loader),
# then bench_step.py's eager ViT-S/16 MimCo (teacher ViT-S/16) and MoCo v3 with their references,
# compiled MimCo, eager and compiled MAE ViT-B/16, MAE ViT-L/16 against a full-sequence ViT-L
# step, and compiled MoCo v3 with its compiled reference. Each block is its own process, stopped
# at its time budget (the rows it printed stay: each is printed once measured); no block starts
# after TOTAL_S seconds (default 470).
#
#   bash benchmarks/gpu_all.sh 2>&1 | tee gpu_all.txt
#   TINY=1 bash benchmarks/gpu_all.sh   # a check of this script: each block on the CPU,
#                                       # tiny ViT, no --compile
# Exit status 1 when a block failed, was stopped or skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
TOTAL_S=${TOTAL_S:-470}
PYTHON=${PYTHON:-python3}
STEP=(--batch_size 256 --steps 20 --warmup 5)
COMPILE=(--compile)
TINY_DATA=()
TINY_STEP=()
if [[ -n ${TINY:-} ]]; then
  export CUDA_VISIBLE_DEVICES=''
  COMPILE=()
  TINY_DATA=(--images 8 --image_size 64 48 --input_size 32 --repeats 1 --num_workers 0
             --batch_size 4 --batches 1 --model vit_digits_patch4_16)
  TINY_STEP=(--model vit_digits_patch4_16 --batch_size 8 --steps 1 --warmup 1 --threads 1
             --device cpu
             --pretrain_args '--moco_mlp_dim 64 --head_dim 64 --decoder_embed_dim 32 '\
'--decoder_depth 1 --decoder_num_heads 2')
fi
COMPILED=("${COMPILE[@]}" --batch_size 256 --steps 20 --warmup 2)  # step 2: no recompile
VIT_S=(--model vit_small_patch16_224)
VIT_B=(--model vit_base_patch16_224)
VIT_L=(--model vit_large_patch16_224)
now_ms() { echo $(( ${EPOCHREALTIME//[.,]/} / 1000 )); }
start=$(now_ms)
incomplete=0

# block SECONDS TITLE SCRIPT FLAGS...: run one benchmark within min(SECONDS, what is left of
# TOTAL_S).
block() {
  local seconds=$1 title=$2 script=$3 left rc why=''
  shift 3
  local argv=("$@")
  if [[ -n ${TINY:-} ]]; then
    if [[ $script == bench_data ]]; then
      argv+=("${TINY_DATA[@]}")
    else
      argv+=("${TINY_STEP[@]}")
    fi
  fi
  left=$(( TOTAL_S * 1000 - $(now_ms) + start ))
  if (( left < seconds * 1000 )); then  # what is left of TOTAL_S: at least 1 s, or 0 (skipped)
    seconds=$(( left > 1000 ? (left + 500) / 1000 : (left > 0 ? 1 : 0) ))
  fi
  printf '\n## %s (%s), budget %d s\n' "$title" "${argv[*]}" "$seconds"
  local block_start=$(now_ms)
  if (( left <= 0 )); then
    why='skipped: out of time'
  else
    # SIGINT: Python's KeyboardInterrupt, which still removes bench_data.py's temporary JPEGs.
    timeout -s INT -k 10 "$seconds" "$PYTHON" -m "benchmarks.$script" "${argv[@]}"
    rc=$?
    (( rc == 124 || rc == 137 )) && why="stopped at its budget of $seconds s"
    (( rc != 0 )) && [[ -z $why ]] && why="failed (exit code $rc)"
  fi
  [[ -n $why ]] && incomplete=$(( incomplete + 1 ))
  echo "-- $(( ($(now_ms) - block_start + 500) / 1000 )) s${why:+: $why}"
}

# In the order of what matters most should time run short.
block 40 'data: decoders, per CPU core, and nvJPEG' bench_data --images 256 --repeats 2
block 35 'data: the nvjpeg training loader, 8 workers' bench_data --table loader \
  --data_backend nvjpeg --methods mimco --images 1024 --num_workers 8 --batch_size 256 --batches 30
block 50 'eager ViT-S/16: MimCo, MoCo v3' bench_step --methods mimco,mocov3 "${VIT_S[@]}" \
  "${STEP[@]}"
block 100 'compiled MimCo ViT-S/16' bench_step --methods mimco --no_reference "${VIT_S[@]}" \
  "${COMPILED[@]}"
block 30 'eager MAE ViT-B/16' bench_step --methods mae "${VIT_B[@]}" "${STEP[@]}"
block 75 'compiled MAE ViT-B/16' bench_step --methods mae --no_reference "${VIT_B[@]}" \
  "${COMPILED[@]}"
block 40 'eager MAE ViT-L/16 and a full-sequence ViT-L step' bench_step --methods mae \
  --batch_size 128 --steps 10 --warmup 3 "${VIT_L[@]}"
block 100 'compiled MoCo v3 ViT-S/16 and its compiled reference' bench_step --methods mocov3 \
  "${VIT_S[@]}" "${COMPILED[@]}"
printf '\ntotal %d s\n' $(( ($(now_ms) - start + 500) / 1000 ))
(( incomplete == 0 ))
