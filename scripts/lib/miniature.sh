# The steps that scripts/demo.sh and scripts/graft_study.sh share, sourced by both. They read
# PYTHON, WORKERS, OUT, WARMUP, START, NAME (the progress prefix) and STAGES (the stage count).

STAGE=0
stage() {  # a progress line: [NAME time, seconds since START] stage i/STAGES: what
  STAGE=$((STAGE + 1))
  echo "[$NAME $(date +%H:%M:%S), $(( $(date +%s) - START )) s] stage $STAGE/$STAGES: $*"
}
warmup() { echo "${WARMUP:-$(( ($1 + 9) / 10 ))}"; }  # WARMUP, else a tenth of the epochs
pretrain() {  # pretrain <folder> <epochs> <flags...>: quiet, the log goes to <folder>/console.txt
  local dir="$OUT/$1" epochs="$2"; shift 2
  mkdir -p "$dir"
  "$PYTHON" main_pretrain.py --epochs "$epochs" --warmup_epochs "$(warmup "$epochs")" \
      --batch_size 64 --num_workers "$WORKERS" --print_freq 100 --output_dir "$dir" "$@" > "$dir/console.txt" 2>&1 \
    || { tail -20 "$dir/console.txt"; exit 1; }
  echo "    $(grep -o 'training time.*' "$dir/console.txt")"
}
evaluate() {  # evaluate <row> <checkpoint> <tools.eval_all flags...>
  local row="$1" checkpoint="$2"; shift 2
  mkdir -p "$OUT/eval/$row"
  "$PYTHON" -m tools.eval_all --checkpoint "$checkpoint" --output_dir "$OUT/eval/$row" --num_workers "$WORKERS" \
      --linear_epochs "$LINEAR_EPOCHS" "$@" > "$OUT/eval/$row/console.txt" 2>&1 \
    || { tail -20 "$OUT/eval/$row/console.txt"; exit 1; }
  echo "    $(grep '\[eval_all\] .*: knn ' "$OUT/eval/$row/console.txt" | sed 's/^\[[0-9:]*\] //')"
}
