"""MTL: MAE and MoCo v3 trained jointly on one encoder, the baseline of Layer Grafted Pre-training
(Jiang et al., ICLR 2023, Table 1). The official repository released no MTL code: the
views and the loss weight are our reading (docs/methods.md)."""

import torch
import torch.nn as nn

from models_mae import MAE
from models_mocov3 import MoCoV3


class MTL(nn.Module):
    """MoCo v3 (base and momentum encoders, projector, predictor) and MAE's decoder around the
    *same* base encoder: loss = MAE loss + `cl_weight` x MoCo v3 loss.

    The shared encoder is registered under both parts (`mae.encoder` and `moco.base_encoder`):
    each part's forward, initialisation and names stay the existing models'; `parameters()` and the
    optimizer see each tensor once, and a checkpoint stores its storage once.
    """

    def __init__(self, mae: MAE, moco: MoCoV3, cl_weight: float = 1.0):
        super().__init__()
        if mae.encoder is not moco.base_encoder:
            raise ValueError("MTL needs one encoder: build MoCoV3 on the MAE's encoder")
        self.mae = mae
        self.moco = moco
        self.cl_weight = cl_weight

    @property
    def base_encoder(self) -> nn.Module:
        """The ViT that both losses train (the backbone that kNN, export and the probes read)."""
        return self.moco.base_encoder

    def update_momentum_encoder(self, m: float) -> None:
        """MoCo v3's key encoder update (engine_pretrain.train_one_epoch calls it each step)."""
        self.moco.update_momentum_encoder(m)

    def forward(
        self,
        view1: torch.Tensor,
        view2: torch.Tensor,
        mim_view: torch.Tensor,
        noise: torch.Tensor = None,
    ) -> tuple:
        """(loss, its terms). views (B, C, H, W): MoCo v3's two augmented views and MAE's
        minimally augmented third view (crop, flip); `noise` (B, N) picks MAE's masked patches."""
        cl_loss, _ = self.moco(view1, view2)
        mim_loss, _ = self.mae(mim_view, noise)
        loss = mim_loss + self.cl_weight * cl_loss
        return loss, {'mae_loss': mim_loss.detach(), 'moco_loss': cl_loss.detach()}
