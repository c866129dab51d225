#!/usr/bin/env bash
# MimCo's ablations in miniature (docs/methods.md), on the built-in digits, on CPU, with the demo's
# settings and pieces (scripts/demo_lib.sh): a MoCo v3 and an MAE teacher (the demo's recipes), then
# MimCo students of the MoCo v3 teacher with the contrastive patch loss (ours, the default), with
# --patch_loss l1 (plain L1 to the teacher's tokens, the paper's baseline), with --patch_loss
# smoothl1 (to layer-normed tokens) and without the image loss (--img_loss none), and a student of
# the MAE teacher. Each backbone: kNN, linear probe, 1 % logistic regression (tools/eval_all.py) and
# the Fisher ratio of its val features (tools/visualize.py); the table: tools/study_table.py, also
# written to <output_dir>/results.md.
#
#   scripts/mimco_study.sh                   # one seed: 5 students of 30 epochs + 2 teachers
#   SEEDS=3 scripts/mimco_study.sh           # (or --seeds 3) seeds 0, 1, 2 in <output_dir>/seed<s>
#   scripts/mimco_study.sh --quick           # 1 epoch a stage: an end-to-end check
#   scripts/mimco_study.sh --output_dir DIR  # default output/mimco_study; its sub-folders are replaced
#   DEMO_DIR=output/demo scripts/mimco_study.sh   # a finished demo's teachers and MimCo student (same
#                                                 # SEEDS and epochs, checked), not new ones
#   DEMO_DIR=output/demo/seed1 scripts/mimco_study.sh --seed 1 --output_dir output/mimco_study/seed1
#                                            # one seed apart (then: python -m tools.study_table)
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/demo_lib.sh
source scripts/lib/reuse.sh  # check_reusable
parse_args scripts/mimco_study.sh output/mimco_study "$@"
settings
NAME=study
STAGES=8
DEMO_DIR=${DEMO_DIR:-}
STUDENTS=(mimco mimco_l1 mimco_smoothl1 mimco_noimg mimco_mae)
BACKBONES=(mae mocov3 "${STUDENTS[@]}")

from_demo() {  # from_demo <folder> <epochs> <flags...>: the demo's run of the same recipe, else trained here
  local name="$1" epochs="$2"; shift 2
  if [ -n "$DEMO_DIR" ]; then
    local from
    from="$(seed_folder "$DEMO_DIR" "$SEED")/$name/checkpoint-last.pth"
    [ -f "$from" ] || { echo "error: DEMO_DIR=$DEMO_DIR has no $from: run the demo with the same SEEDS" >&2; exit 2; }
    check_reusable "$from" "$epochs" "$SEED"
    mkdir -p "$OUT/$name"
    cp "$from" "$OUT/$name/checkpoint-last.pth"
    echo "    the demo's: $from"
    return
  fi
  pretrain "$name" "$epochs" "$@"
}

study_seed() {  # study_seed <seed>: the teachers, the students and their evaluations, into $OUT
  SEED=$1
  STAGE=0
  for name in "${BACKBONES[@]}"; do rm -rf "${OUT:?}/$name"; done
  rm -rf "$OUT/eval" "$OUT/pictures" "$OUT/results.md"
  mkdir -p "$OUT"
  echo "[study] digits, CPU; seed $SEED; output in $OUT; epochs: MoCo v3 $MOCO_EPOCHS, MAE $MAE_EPOCHS," \
       "each student $MIMCO_EPOCHS"
  local teacher_flags=("${MIMCO[@]}" --teacher "$OUT/mocov3/checkpoint-last.pth")

  stage "teachers: MoCo v3 $(epochs $MOCO_EPOCHS), MAE $(epochs $MAE_EPOCHS) (the demo's recipes)"
  from_demo mocov3 "$MOCO_EPOCHS" "${MOCO[@]}"
  from_demo mae "$MAE_EPOCHS" "${MAE[@]}"
  stage "student, contrastive patch loss (ours, the default), $(epochs $MIMCO_EPOCHS)"
  from_demo mimco "$MIMCO_EPOCHS" "${teacher_flags[@]}"  # the demo's MimCo row is this run
  stage "student, --patch_loss l1 (plain L1 to the teacher's tokens)"
  pretrain mimco_l1 "$MIMCO_EPOCHS" "${teacher_flags[@]}" --patch_loss l1
  stage "student, --patch_loss smoothl1 (to the layer-normed tokens)"
  pretrain mimco_smoothl1 "$MIMCO_EPOCHS" "${teacher_flags[@]}" --patch_loss smoothl1
  stage "student without the image loss (--img_loss none)"
  pretrain mimco_noimg "$MIMCO_EPOCHS" "${teacher_flags[@]}" --img_loss none
  stage "student of the MAE teacher (no projector: its raw CLS token is the image target)"
  pretrain mimco_mae "$MIMCO_EPOCHS" "${MIMCO[@]}" --teacher "$OUT/mae/checkpoint-last.pth"

  stage "evaluate the 7 backbones (kNN, linear, 1 %)"
  for name in "${BACKBONES[@]}"; do
    evaluate "$name" "$OUT/$name/checkpoint-last.pth" --protocols knn linear logreg1
  done
  stage "Fisher ratio of each backbone's val features (tools/visualize.py)"
  local checkpoints=()
  for name in "${BACKBONES[@]}"; do checkpoints+=("$OUT/$name/checkpoint-last.pth"); done
  "$PYTHON" -m tools.visualize --checkpoints "${checkpoints[@]}" --names "${BACKBONES[@]}" \
      --output_dir "$OUT/pictures" --seed "$SEED" --tsne_iters 250 > "$OUT/pictures.txt" 2>&1 \
    || { tail -20 "$OUT/pictures.txt"; exit 1; }
  sed -n 's/^\(\[[0-9:]*\] \)\{0,1\}\(separability |.*\)/    \2/p' "$OUT/pictures.txt"
}

for seed in $(seq "$FIRST_SEED" $((FIRST_SEED + SEEDS - 1))); do
  OUT=$(seed_folder "$ROOT_OUT" "$seed")
  study_seed "$seed"
done

echo "[study] done in $(( $(date +%s) - START )) s"
"$PYTHON" -m tools.study_table --output_dir "$ROOT_OUT" --command "$COMMAND" \
    --wall_time "$(( $(date +%s) - START ))"
