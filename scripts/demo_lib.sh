# The pieces scripts/demo.sh and scripts/mimco_study.sh share (sourced, not run): the miniature's
# command line, epochs and small-scale settings (measured: scripts/demo.sh's header, docs/demo.md),
# the seeds, and quiet pre-training and evaluation of one backbone. A caller runs parse_args and
# settings, sets STAGES (its number of stages), NAME, and per seed OUT (the seed's folder) and SEED.

parse_args() {  # parse_args <script> <default output_dir> "$@": ROOT_OUT, QUICK, SEEDS, FIRST_SEED, COMMAND
  local script="$1"
  ROOT_OUT="$2"
  shift 2
  QUICK=0
  FIRST_SEED=0
  COMMAND="$script${*:+ $*}"
  if [ "${SEEDS:-1}" != 1 ]; then COMMAND="SEEDS=$SEEDS $COMMAND"; fi
  while [ $# -gt 0 ]; do
    case "$1" in
      --quick) QUICK=1 ;;
      --output_dir) ROOT_OUT="$2"; shift ;;
      --seeds) SEEDS="$2"; shift ;;
      --seed) FIRST_SEED="$2"; shift ;;
      *) echo "usage: $script [--quick] [--output_dir DIR] [--seeds N | --seed S]" >&2; exit 2 ;;
    esac
    shift
  done
  SEEDS=${SEEDS:-1}  # pre-training seeds 0 .. SEEDS-1, each the whole pipeline in <output_dir>/seed<s>
  case "$SEEDS" in
    ''|*[!0-9]*|0) echo "error: SEEDS=$SEEDS: give a number of seeds, at least 1 (SEEDS=3)" >&2; exit 2 ;;
  esac
  # --seed S: the one seed S in <output_dir> itself (a seed run apart, e.g. beside another job).
  case "$FIRST_SEED" in
    ''|*[!0-9]*) echo "error: --seed $FIRST_SEED: give a seed number (--seed 1)" >&2; exit 2 ;;
  esac
  if [ "$FIRST_SEED" != 0 ] && [ "$SEEDS" != 1 ]; then
    echo "error: --seed $FIRST_SEED runs one seed: drop SEEDS=$SEEDS (or --seeds), or --seed" >&2
    exit 2
  fi
}

settings() {  # the epochs (1 a stage with --quick) and the tools
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
  DRAWS=${DRAWS:-}                  # draws of the 1 % / 10 % subsets; empty: main_linprobe.py's (10 on digits)
  if [ "$QUICK" = 1 ]; then DRAWS=${DRAWS:-2}; fi
}

# The demo's recipes: MoCo v3 (also the grafted stage 2), the MimCo student (besides --teacher), MAE.
MOCO=(--method mocov3 --moco_mlp_dim 512 --moco_m 0.8 --blr 3e-3)
MIMCO=(--method mimco --batch_size 128 --blr 2e-3 --drop_path 0 --opt_betas 0.9 0.999 --head_dim 256)
MAE=(--method mae --decoder_embed_dim 64 --decoder_depth 2 --decoder_num_heads 4 --blr 1e-3)

START=$(date +%s)
seed_folder() {  # seed_folder <root> <seed>: the root itself for one seed, else <root>/seed<s>
  if [ "$SEEDS" = 1 ]; then echo "$1"; else echo "$1/seed$2"; fi
}
stage() {
  STAGE=$((STAGE + 1))
  local seed=""
  if [ "$SEEDS" != 1 ]; then seed="seed $SEED, "; fi
  echo "[${NAME:-demo} $(date +%H:%M:%S), $(( $(date +%s) - START )) s] ${seed}stage $STAGE/$STAGES: $*"
}
warmup() { echo "${WARMUP:-$(( ($1 + 9) / 10 ))}"; }
epochs() { if [ "$1" = 1 ]; then echo "1 epoch"; else echo "$1 epochs"; fi; }
pretrain() {  # pretrain <folder> <epochs> <flags...>: quiet, the log goes to $OUT/<folder>/console.txt
  local dir="$OUT/$1" epochs="$2"; shift 2
  mkdir -p "$dir"
  "$PYTHON" main_pretrain.py --epochs "$epochs" --warmup_epochs "$(warmup "$epochs")" --seed "$SEED" \
      --batch_size 64 --num_workers "$WORKERS" --print_freq 100 --output_dir "$dir" "$@" > "$dir/console.txt" 2>&1 \
    || { tail -20 "$dir/console.txt"; exit 1; }
  echo "    $(grep -o 'training time.*' "$dir/console.txt")"
}
evaluate() {  # evaluate <row> <checkpoint> [eval_all flags...]
  local dir="$OUT/eval/$1" checkpoint="$2"; shift 2
  mkdir -p "$dir"
  if [ -n "$DRAWS" ]; then set -- --subset_draws "$DRAWS" "$@"; fi
  "$PYTHON" -m tools.eval_all --checkpoint "$checkpoint" --output_dir "$dir" --num_workers "$WORKERS" \
      --linear_epochs "$LINEAR_EPOCHS" --finetune_epochs "$FT_EPOCHS" --seed "$SEED" \
      --finetune_warmup "$(warmup "$FT_EPOCHS")" --finetune_blr 2e-3 "$@" > "$dir/console.txt" 2>&1 \
    || { tail -20 "$dir/console.txt"; exit 1; }
  echo "    $(grep '\[eval_all\] .*: knn ' "$dir/console.txt" | sed 's/^\[[0-9:]*\] //')"
}
