"""Schedules that timm lacks (the learning rate itself comes from timm's CosineLRScheduler)."""
import math


def moco_momentum(epoch_progress: float, base_m: float, epochs: int, cosine: bool = True) -> float:
    """MoCo v3's momentum for the key encoder: m rises from base_m to 1 by a half cosine."""
    if not cosine:
        return base_m
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch_progress / epochs)) * (1.0 - base_m)
