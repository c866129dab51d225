#!/usr/bin/env bash
# The papers in miniature (docs/demo.md), on the built-in digits, on CPU:
#   MoCo v3 teacher -> MimCo student;  MAE -> grafted MoCo v3 (--lr_layer_wise 0.1,0.1,1);
#   a random-init baseline; each evaluated by kNN, linear probe, 1 % / 10 % logistic regression and
#   a short fine-tune (tools/eval_all.py); one Markdown table at the end (tools/demo_table.py), also
#   written to <output_dir>/results.md.
#
#   scripts/demo.sh                        # about 16 min on 2 idle CPU cores (15 min 33 s, 2026-11-30)
#   scripts/demo.sh --quick                # 1 epoch a stage: an end-to-end check (about 4 min on 2 cores)
#   scripts/demo.sh --output_dir DIR       # default output/demo; the demo's sub-folders are replaced
#   MIMCO_EPOCHS=60 MAE_EPOCHS=100 GRAFT_EPOCHS=40 scripts/demo.sh   # the design prototype's sizes (docs/demo.md)
#
# One MoCo v3 run is both MimCo's teacher and the MoCo v3 row, trained for as many epochs as the grafted
# stage 2 (GRAFT_EPOCHS), so that the Layer Grafted comparison is at an equal stage-2 budget.
# Small-scale settings, measured on digits (kNN top-1 after 10 MoCo v3 epochs): with ~22 steps an epoch,
# ImageNet's key-encoder momentum 0.99 lags ~100 steps (5 epochs) behind, so --moco_m 0.8 (kNN 83.1;
# 0.9: 81.4; 0.99: 75.6); batch 64 beats 128 at the same compute (81.4 vs 80.0 at m 0.9); blr 3e-3 for
# MoCo v3 (1.5e-4: 72.5 at m 0.99), 1e-3 for MAE, 2e-3 for the fine-tune (5 epochs: 60.3 vs 45.6 at
# 5e-4). MimCo: batch 128 at blr 2e-3 (lr 1e-3; the earlier lr 2.5e-4 learned 4x slower), no drop path,
# AdamW betas (0.9, 0.999), 256-wide heads (docs/demo.md: the controlled comparison).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=output/demo
QUICK=0
COMMAND="scripts/demo.sh${*:+ $*}"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --output_dir) OUT="$2"; shift ;;
    *) echo "usage: scripts/demo.sh [--quick] [--output_dir DIR]" >&2; exit 2 ;;
  esac
  shift
done

PYTHON=${PYTHON:-python}
WORKERS=${WORKERS:-0}  # 1 worker saved only ~10 % of a MoCo v3 epoch on 2 cores (measured); 0 keeps one process
if [ "$QUICK" = 1 ]; then
  MIMCO_EPOCHS=1 MAE_EPOCHS=1 GRAFT_EPOCHS=1 FT_EPOCHS=1 LINEAR_EPOCHS=2 WARMUP=0
fi
GRAFT_EPOCHS=${GRAFT_EPOCHS:-20}  # ~9 s/epoch on 2 cores (the design prototype: 40)
MOCO_EPOCHS=$GRAFT_EPOCHS         # MimCo's teacher and the MoCo v3 row: the grafted stage 2's epochs
MIMCO_EPOCHS=${MIMCO_EPOCHS:-30}  # ~5 s/epoch (prototype: 60)
MAE_EPOCHS=${MAE_EPOCHS:-60}      # ~2.8 s/epoch (prototype: 100)
FT_EPOCHS=${FT_EPOCHS:-5}         # ~5 s/epoch; each of the 5 rows' evaluations takes ~45 s in all
LINEAR_EPOCHS=${LINEAR_EPOCHS:-90}
WARMUP=${WARMUP:-}                # empty: about a tenth of each stage's epochs

START=$(date +%s)
NAME=demo
STAGES=9
source scripts/lib/miniature.sh  # stage, warmup, pretrain, evaluate
epochs() { if [ "$1" = 1 ]; then echo "1 epoch"; else echo "$1 epochs"; fi; }
FINETUNE=(--finetune_epochs "$FT_EPOCHS" --finetune_warmup "$(warmup "$FT_EPOCHS")" --finetune_blr 2e-3)

rm -rf "$OUT/mocov3" "$OUT/mimco" "$OUT/mae" "$OUT/grafted" "$OUT/eval" "$OUT/results.md"
mkdir -p "$OUT"
echo "[demo] digits, CPU; output in $OUT; epochs: MoCo v3 $MOCO_EPOCHS, MimCo $MIMCO_EPOCHS, MAE $MAE_EPOCHS," \
     "grafted $GRAFT_EPOCHS, fine-tune $FT_EPOCHS"

stage "MoCo v3, $(epochs $MOCO_EPOCHS) (MimCo's teacher; as many epochs as the grafted stage 2)"
MOCO=(--method mocov3 --moco_mlp_dim 512 --moco_m 0.8 --blr 3e-3)
pretrain mocov3 "$MOCO_EPOCHS" "${MOCO[@]}"
stage "MimCo student of that teacher, $(epochs $MIMCO_EPOCHS)"
pretrain mimco "$MIMCO_EPOCHS" --method mimco --teacher "$OUT/mocov3/checkpoint-last.pth" --batch_size 128 \
    --blr 2e-3 --drop_path 0 --opt_betas 0.9 0.999 --head_dim 256
stage "MAE, $(epochs $MAE_EPOCHS) (Layer Grafted stage 1)"
pretrain mae "$MAE_EPOCHS" --method mae --decoder_embed_dim 64 --decoder_depth 2 --decoder_num_heads 4 --blr 1e-3
stage "grafted MoCo v3 from the MAE, $(epochs $GRAFT_EPOCHS), --lr_layer_wise 0.1,0.1,1 (stage 2)"
pretrain grafted "$GRAFT_EPOCHS" "${MOCO[@]}" \
    --graft_pretrained "$OUT/mae/checkpoint-last.pth" --lr_layer_wise 0.1,0.1,1

stage "evaluate random init (kNN, linear, 1 %, 10 %, fine-tune from scratch)"
evaluate random random "${FINETUNE[@]}"
for row in mocov3 mimco mae grafted; do
  stage "evaluate $row (kNN, linear, 1 %, 10 %, fine-tune)"
  evaluate "$row" "$OUT/$row/checkpoint-last.pth" "${FINETUNE[@]}"
done

echo "[demo] done in $(( $(date +%s) - START )) s"
"$PYTHON" -m tools.demo_table --output_dir "$OUT" --command "$COMMAND" --wall_time "$(( $(date +%s) - START ))"
echo "[demo] table in $OUT/results.md; pictures: $PYTHON -m tools.visualize --checkpoints random" \
     "$OUT/mocov3/checkpoint-last.pth $OUT/mimco/checkpoint-last.pth $OUT/mae/checkpoint-last.pth" \
     "$OUT/grafted/checkpoint-last.pth --output_dir $OUT/pictures"
