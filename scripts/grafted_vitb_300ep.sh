#!/usr/bin/env bash
# Paper row: Layer Grafted Pre-training ViT-B/16 (Jiang et al., ICLR 2023): MAE 1600 epochs, then
# grafted MoCo v3 300 epochs, lower two thirds of the blocks at 0.1x lr -> 1 % logistic regression
# 65.5 (ImageNet-1K top-1); also its 10 % fine-tune, full fine-tune and linear probe. One node of 8
# GPUs.
# Stage 1: scripts/mae_vitb_1600ep.sh, or the official MAE file (MAE=mae_pretrain_vit_base.pth).
#   DATA=/data/imagenet SUBSETS=imagenet_subsets scripts/grafted_vitb_300ep.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/imagenet}
SUBSETS=${SUBSETS:-imagenet_subsets}   # SimCLR's 1percent.txt / 10percent.txt
MAE=${MAE:-output/mae_vitb_1600ep/checkpoint-last.pth}
OUT=${OUT:-output/grafted_vitb_300ep}
# One node of 8 GPUs by torchrun; on SLURM, each stage a submitit job that the next waits for:
#   LAUNCH="python submitit_launch.py --wait --ngpus 8 --partition P" scripts/grafted_vitb_300ep.sh
LAUNCH=${LAUNCH:-torchrun --nproc_per_node 8}

# Stage 2: MoCo v3 from the MAE encoder, total batch 4096 (8 x 512; contrastive negatives need the
# whole batch in one step, so gradient checkpointing rather than accumulation), lr multipliers
# 0.1,0.1,1 of blr 1.5e-4 over three groups of four blocks, patch/position embeddings frozen.
$LAUNCH main_pretrain.py --method mocov3 --model vit_base_patch16_224 \
    --graft_pretrained "$MAE" --lr_layer_wise 0.1,0.1,1 --data_path "$DATA" \
    --batch_size 512 --grad_ckpt --epochs 300 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.1 \
    --output_dir "$OUT"

# 1 % labels: logistic regression on the frozen CLS token; paper: 65.5.
$LAUNCH main_linprobe.py --protocol logreg --checkpoint "$OUT/checkpoint-last.pth" \
    --subset_file "$SUBSETS/1percent.txt" --data_path "$DATA" --batch_size 512 \
    --output_dir "$OUT/logreg1"

# 10 % labels: fine-tuning the CLS token with the projector's first Linear (no bias) in front of
# the classifier (Layer Grafted's protocol: blr 3e-5, layer decay 0.75, 200 epochs, batch 1024).
$LAUNCH main_finetune.py --model vit_base_patch16_224 \
    --finetune "$OUT/checkpoint-last.pth" --init_from_projector --cls_token \
    --subset_file "$SUBSETS/10percent.txt" --data_path "$DATA" --batch_size 128 \
    --epochs 200 --blr 3e-5 --layer_decay 0.75 --output_dir "$OUT/semi10"

# Full fine-tuning (Layer Grafted's recipe: CLS token, layer decay 0.6, 100 epochs, blr 5e-4,
# total batch 1024, drop path 0.1, 5 warm-up epochs).
$LAUNCH main_finetune.py --model vit_base_patch16_224 \
    --finetune "$OUT/checkpoint-last.pth" --cls_token --data_path "$DATA" --batch_size 128 \
    --epochs 100 --blr 5e-4 --layer_decay 0.6 --drop_path 0.1 --warmup_epochs 5 \
    --output_dir "$OUT/finetune"

# Linear probe (MAE's protocol: LARS, blr 0.1, total batch 16384, 90 epochs).
$LAUNCH main_linprobe.py --checkpoint "$OUT/checkpoint-last.pth" \
    --data_path "$DATA" --batch_size 2048 --epochs 90 --warmup_epochs 10 --blr 0.1 \
    --output_dir "$OUT/linear"
