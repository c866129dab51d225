#!/usr/bin/env bash
# Layer Grafted's argument in miniature (docs/methods.md), on the built-in digits, on CPU: its Table 1
# rows -- MAE, MoCo v3, MTL (both losses on one encoder), the reverse cascade (MoCo v3, then MAE at
# 0.1,0.1,1), MAE -> MoCo v3 with the lower 4 of 6 blocks frozen, at 1,1,1 and at 0.1,0.1,1 (Layer
# Grafted) -- each evaluated as scripts/demo.sh evaluates (kNN, linear, 1 % and 10 % logistic
# regression; no fine-tune), one table (tools/demo_table.py --layout graft_study) with the paper's
# orderings, and the per-sample gradient conflict (tools/grad_conflict.py) of MTL at a third of its
# training and at its end, of the MAE and of the grafted model: conflict.png and conflict.txt.
#
#   scripts/graft_study.sh                         # all stages (22-25 min with --from_demo, measured)
#   scripts/graft_study.sh --quick                 # 1 epoch a stage, 16 samples: an end-to-end check
#   scripts/graft_study.sh --from_demo output/demo # reuse the demo's MAE, MoCo v3 and grafted runs
#                                                  # (same epochs and seed, checked)
#   scripts/graft_study.sh --seed 1 --from_demo output/demo/seed1 --output_dir output/graft_study/seed1
#   scripts/graft_study.sh --seed 1 --output_dir output/graft_study_1   # another seed
#
# As the paper compares them, every contrastive stage (MoCo v3, MTL, each MAE -> MoCo v3 stage 2)
# runs CL_EPOCHS; the MAE stages (stage 1, and the reverse cascade's MAE on top of MoCo v3) run
# MAE_EPOCHS. The settings are scripts/demo.sh's (its measurements); MTL takes MoCo v3's (blr 3e-3,
# momentum 0.8) with the demo's MAE decoder, and --mtl_cl_weight 1 (our reading).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=output/graft_study
QUICK=0
FROM_DEMO=
SEED=0
COMMAND="scripts/graft_study.sh${*:+ $*}"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --output_dir) OUT="$2"; shift ;;
    --from_demo) FROM_DEMO="$2"; shift ;;
    --seed) SEED="$2"; shift ;;
    *) echo "usage: scripts/graft_study.sh [--quick] [--output_dir DIR] [--from_demo DIR] [--seed N]" >&2
       exit 2 ;;
  esac
  shift
done

PYTHON=${PYTHON:-python}
WORKERS=${WORKERS:-0}
if [ "$QUICK" = 1 ]; then
  CL_EPOCHS=1 MAE_EPOCHS=1 LINEAR_EPOCHS=2 WARMUP=0 NUM_SAMPLES=16
fi
CL_EPOCHS=${CL_EPOCHS:-20}        # the demo's grafted stage 2 and MoCo v3 (~9 s/epoch; MTL ~12 s)
MAE_EPOCHS=${MAE_EPOCHS:-60}      # the demo's MAE (~2.8 s/epoch)
LINEAR_EPOCHS=${LINEAR_EPOCHS:-90}
NUM_SAMPLES=${NUM_SAMPLES:-256}   # gradient conflict: images per checkpoint
WARMUP=${WARMUP:-}                # empty: about a tenth of each stage's epochs
THIRD=$(( (CL_EPOCHS + 2) / 3 ))  # MTL's checkpoint at a third of its training: after THIRD epochs

START=$(date +%s)
NAME=graft_study
STAGES=15
source scripts/lib/miniature.sh  # stage, warmup, pretrain, evaluate
source scripts/lib/reuse.sh       # check_reusable
reuse_or_pretrain() {  # the demo's run of the same settings when --from_demo has it, else train it
  if [ -n "$FROM_DEMO" ] && [ -f "$FROM_DEMO/$1/checkpoint-last.pth" ]; then
    check_reusable "$FROM_DEMO/$1/checkpoint-last.pth" "$2" "$SEED"
    ln -s "$(cd "$FROM_DEMO/$1" && pwd)" "$OUT/$1"
    echo "    reused $FROM_DEMO/$1"
  else
    pretrain "$@"
  fi
}
ROWS=(mae mocov3 mtl reverse frozen grafted_111 grafted)
rm -rf "${ROWS[@]/#/$OUT/}" "$OUT/eval" "$OUT/results.md" "$OUT/conflict.png" "$OUT/conflict.txt"
mkdir -p "$OUT"
echo "[graft_study] digits, CPU, seed $SEED; output in $OUT; epochs: contrastive stages $CL_EPOCHS, MAE $MAE_EPOCHS"

MOCO=(--method mocov3 --moco_mlp_dim 512 --moco_m 0.8 --blr 3e-3 --seed "$SEED")
DECODER=(--decoder_embed_dim 64 --decoder_depth 2 --decoder_num_heads 4)
MAE_CKPT="$OUT/mae/checkpoint-last.pth"
stage "MAE, $MAE_EPOCHS epochs"
reuse_or_pretrain mae "$MAE_EPOCHS" --method mae "${DECODER[@]}" --blr 1e-3 --seed "$SEED"
stage "MoCo v3, $CL_EPOCHS epochs"
reuse_or_pretrain mocov3 "$CL_EPOCHS" "${MOCO[@]}"
stage "MTL: MAE + MoCo v3 on one encoder, $CL_EPOCHS epochs"
pretrain mtl "$CL_EPOCHS" "${MOCO[@]}" --method mtl "${DECODER[@]}" --save_freq "$THIRD"
stage "reverse cascade: MAE on the MoCo v3, $MAE_EPOCHS epochs, --lr_layer_wise 0.1,0.1,1"
pretrain reverse "$MAE_EPOCHS" --method mae "${DECODER[@]}" --blr 1e-3 --seed "$SEED" \
    --graft_pretrained "$OUT/mocov3/checkpoint-last.pth" --lr_layer_wise 0.1,0.1,1
stage "MAE -> MoCo v3 with blocks 0-3 frozen (the official --fixTo 4), $CL_EPOCHS epochs"
pretrain frozen "$CL_EPOCHS" "${MOCO[@]}" --graft_pretrained "$MAE_CKPT" --lr_layer_wise 1,1,1 \
    --graft_freeze_blocks 4
stage "MAE -> MoCo v3 at --lr_layer_wise 1,1,1 (MoCo v3 fine-tuning of the MAE), $CL_EPOCHS epochs"
pretrain grafted_111 "$CL_EPOCHS" "${MOCO[@]}" --graft_pretrained "$MAE_CKPT" --lr_layer_wise 1,1,1
stage "Layer Grafted: MAE -> MoCo v3 at --lr_layer_wise 0.1,0.1,1, $CL_EPOCHS epochs"
reuse_or_pretrain grafted "$CL_EPOCHS" "${MOCO[@]}" --graft_pretrained "$MAE_CKPT" --lr_layer_wise 0.1,0.1,1

for row in "${ROWS[@]}"; do
  stage "evaluate $row (kNN, linear, 1 %, 10 %)"
  evaluate "$row" "$OUT/$row/checkpoint-last.pth" --seed "$SEED" --protocols knn linear logreg1 logreg10
done

stage "gradient conflict per sample and block, $NUM_SAMPLES images each: MTL after $THIRD and $CL_EPOCHS epochs, MAE, grafted"
"$PYTHON" -m tools.grad_conflict --num_samples "$NUM_SAMPLES" --num_workers "$WORKERS" --seed "$SEED" \
    --checkpoint "$OUT/mtl/checkpoint-$((THIRD - 1)).pth" "$OUT/mtl/checkpoint-last.pth" "$MAE_CKPT" \
    "$OUT/grafted/checkpoint-last.pth" --moco_mlp_dim 512 "${DECODER[@]}" --output "$OUT/conflict.png" \
    > "$OUT/conflict.txt" 2>&1 || { tail -20 "$OUT/conflict.txt"; exit 1; }
grep -v '^loaded the backbone' "$OUT/conflict.txt"

echo "[graft_study] done in $(( $(date +%s) - START )) s"
"$PYTHON" -m tools.demo_table --layout graft_study --output_dir "$OUT" --command "$COMMAND" \
    --wall_time "$(( $(date +%s) - START ))"
{ echo; echo 'Gradient conflict (tools/grad_conflict.py; figure: conflict.png):'; echo '```';
  grep -v '^loaded the backbone' "$OUT/conflict.txt"; echo '```'; } >> "$OUT/results.md"
echo "[graft_study] table and conflict in $OUT/results.md, figure in $OUT/conflict.png"
