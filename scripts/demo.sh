#!/usr/bin/env bash
# The papers in miniature (docs/demo.md), on the built-in digits, on CPU:
#   MoCo v3 teacher -> MimCo student;  MAE -> grafted MoCo v3 (--lr_layer_wise 0.1,0.1,1);
#   a random-init baseline; each evaluated by kNN, linear probe, 1 % / 10 % logistic regression and
#   a short fine-tune (tools/eval_all.py); one Markdown table at the end (tools/demo_table.py), also
#   written to <output_dir>/results.md.
#
#   scripts/demo.sh                        # about 16 min on 2 idle CPU cores (15 min 33 s, 2026-11-30),
#                                          # before the 10 subset draws of each 1 % / 10 % evaluation (~1.5 s a
#                                          # draw on 2 loaded cores: ~2.5 min more; DRAWS=1 for the old single draw)
#   scripts/demo.sh --quick                # 1 epoch a stage: an end-to-end check (about 4 min on 2 cores)
#   scripts/demo.sh --output_dir DIR       # default output/demo; the demo's sub-folders are replaced
#   SEEDS=3 scripts/demo.sh                # (or --seeds 3) the whole pipeline for pre-training seeds 0, 1, 2
#                                          # in output/demo/seed<s>; the table: mean ± std over the seeds
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

source scripts/demo_lib.sh
parse_args scripts/demo.sh output/demo "$@"
settings
STAGES=9

demo_seed() {  # demo_seed <seed>: the whole pipeline, pre-training and evaluation, into $OUT
  SEED=$1
  STAGE=0
  rm -rf "$OUT/mocov3" "$OUT/mimco" "$OUT/mae" "$OUT/grafted" "$OUT/eval" "$OUT/results.md"
  mkdir -p "$OUT"
  echo "[demo] digits, CPU; seed $SEED; output in $OUT; epochs: MoCo v3 $MOCO_EPOCHS, MimCo $MIMCO_EPOCHS," \
       "MAE $MAE_EPOCHS, grafted $GRAFT_EPOCHS, fine-tune $FT_EPOCHS"

  stage "MoCo v3, $(epochs $MOCO_EPOCHS) (MimCo's teacher; as many epochs as the grafted stage 2)"
  pretrain mocov3 "$MOCO_EPOCHS" "${MOCO[@]}"
  stage "MimCo student of that teacher, $(epochs $MIMCO_EPOCHS)"
  pretrain mimco "$MIMCO_EPOCHS" "${MIMCO[@]}" --teacher "$OUT/mocov3/checkpoint-last.pth"
  stage "MAE, $(epochs $MAE_EPOCHS) (Layer Grafted stage 1)"
  pretrain mae "$MAE_EPOCHS" "${MAE[@]}"
  stage "grafted MoCo v3 from the MAE, $(epochs $GRAFT_EPOCHS), --lr_layer_wise 0.1,0.1,1 (stage 2)"
  pretrain grafted "$GRAFT_EPOCHS" "${MOCO[@]}" \
      --graft_pretrained "$OUT/mae/checkpoint-last.pth" --lr_layer_wise 0.1,0.1,1

  stage "evaluate random init (kNN, linear, 1 %, 10 %, fine-tune from scratch)"
  evaluate random random
  for row in mocov3 mimco mae grafted; do
    stage "evaluate $row (kNN, linear, 1 %, 10 %, fine-tune)"
    evaluate "$row" "$OUT/$row/checkpoint-last.pth"
  done
}

for seed in $(seq "$FIRST_SEED" $((FIRST_SEED + SEEDS - 1))); do
  OUT=$(seed_folder "$ROOT_OUT" "$seed")
  demo_seed "$seed"
  if [ "$SEEDS" != 1 ]; then  # each seed's own table, in its folder
    "$PYTHON" -m tools.demo_table --output_dir "$OUT" --command "$COMMAND (seed $seed)" > /dev/null
  fi
done

echo "[demo] done in $(( $(date +%s) - START )) s"
"$PYTHON" -m tools.demo_table --output_dir "$ROOT_OUT" --command "$COMMAND" --wall_time "$(( $(date +%s) - START ))"
OUT=$(seed_folder "$ROOT_OUT" 0)
echo "[demo] table in $ROOT_OUT/results.md; pictures: $PYTHON -m tools.visualize --checkpoints random" \
     "$OUT/mocov3/checkpoint-last.pth $OUT/mimco/checkpoint-last.pth $OUT/mae/checkpoint-last.pth" \
     "$OUT/grafted/checkpoint-last.pth --output_dir $OUT/pictures"
