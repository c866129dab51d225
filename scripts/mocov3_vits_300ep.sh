#!/usr/bin/env bash
# Paper row: MoCo v3 ViT-S/16, 300 epochs (Chen et al., 2021) -> linear probe 73.2, fine-tune 81.4
# (ImageNet-1K top-1). Also the teacher of scripts/mimco_vits_100ep.sh. One node of 8 GPUs.
# mocov3_vit_small is the official MoCo v3 ViT-S: 12 heads (timm's vit_small_patch16_224 has 6).
#   DATA=/data/imagenet scripts/mocov3_vits_300ep.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/imagenet}
OUT=${OUT:-output/mocov3_vits_300ep}
# One node of 8 GPUs by torchrun; on SLURM, each stage a submitit job that the next waits for:
#   LAUNCH="python submitit_launch.py --wait --ngpus 8 --partition P" scripts/mocov3_vits_300ep.sh
LAUNCH=${LAUNCH:-torchrun --nproc_per_node 8}

# Pre-training: total batch 1024 (8 x 128), lr = 1.5e-4 x 1024 / 256, wd 0.1, 40 warm-up epochs.
$LAUNCH main_pretrain.py --method mocov3 --model mocov3_vit_small \
    --data_path "$DATA" --batch_size 128 --epochs 300 --warmup_epochs 40 \
    --blr 1.5e-4 --weight_decay 0.1 --moco_t 0.2 --moco_m 0.99 --output_dir "$OUT"

# Linear probe (MAE's protocol: LARS, blr 0.1, total batch 16384, 90 epochs); paper: 73.2 (MoCo v3's
# main_lincls.py: --protocol lincls_mocov3, lr 3 per 256, to reproduce it that way).
$LAUNCH main_linprobe.py --checkpoint "$OUT/checkpoint-last.pth" \
    --data_path "$DATA" --batch_size 2048 --epochs 90 --warmup_epochs 10 --blr 0.1 \
    --output_dir "$OUT/linear"

# Fine-tune (BEiT/MAE recipe, 100 epochs, total batch 1024); paper: 81.4.
$LAUNCH main_finetune.py --finetune "$OUT/checkpoint-last.pth" \
    --data_path "$DATA" --batch_size 128 --epochs 100 --warmup_epochs 5 --blr 5e-4 \
    --layer_decay 0.75 --drop_path 0.1 --output_dir "$OUT/finetune"
