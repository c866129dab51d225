# Reusing another script's finished run (sourced, not run): scripts/mimco_study.sh (DEMO_DIR) and
# scripts/graft_study.sh (--from_demo) take the demo's runs of the same recipe instead of training
# them again, once the checkpoint says it ran the same epochs with the same seed.

check_reusable() {  # check_reusable <checkpoint> <epochs> <seed>: exit 2 with one line if not
  local checkpoint="$1" epochs="$2" seed="$3" found
  found=$("${PYTHON:-python}" -c "import sys; from util.checkpoint import load_file
args = load_file(sys.argv[1])['args']
print(args['epochs'], args['seed'])" "$checkpoint") \
    || { echo "error: cannot read $checkpoint to reuse it" >&2; exit 2; }
  if [ "$found" != "$epochs $seed" ]; then
    echo "error: $checkpoint ran (epochs seed) $found, not $epochs $seed: run the demo with the" \
         "same epochs and seed, or train here (no DEMO_DIR / --from_demo)" >&2
    exit 2
  fi
}
