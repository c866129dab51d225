"""Published classifier files scored with their own head by `main_finetune.py --eval`: DeiT's
release ({'model': ViT with `head.*`}), its training layout ({'model', 'optimizer', 'epoch', 'args'}
with args an argparse.Namespace), timm's plain state dicts, MoCo v3's main_lincls.py output and the
fine-tuned files of these scripts."""

import torch

from util.backbones import read_backbone
from util.checkpoint import load_file
from util.errors import InputError


def written_here(path: str) -> bool:
    """Whether `path` is a training checkpoint of these scripts (util/checkpoint.training_state:
    args as a plain dict, an epoch and an optimizer), which --resume continues."""
    saved = load_file(path)
    return isinstance(saved.get('args'), dict) and 'epoch' in saved and 'optimizer' in saved


def classifier_to_score(evaluate: bool, resume: str, finetune: str) -> str:
    """The file whose own classifier `--eval` scores: a --resume that is not a training checkpoint
    of these scripts, else --finetune; '' without --eval, or when --eval resumes one of ours (or
    scores a random init)."""
    if not evaluate:
        return ''
    if resume:
        if written_here(resume):
            return ''
        return resume
    return finetune


def read_classifier(path: str, num_classes: int) -> tuple:
    """(the Linear head of `path` as {'weight' (C, D), 'bias' (C,)}, whether it classifies the mean
    of the patch tokens (a file with `fc_norm`, MAE's global pool) rather than the CLS token).

    Raises InputError when the file holds no classifier, or one of another class count than the
    data's `num_classes`.
    """
    state_dict, _, info = read_backbone(path)
    classifier = info['classifier']
    if classifier is None:
        raise InputError(
            f'{path} holds no classifier (no head.weight / head.bias), only a backbone: --eval '
            f'scores a trained classifier; fine-tune this backbone first (drop --eval)'
        )
    classes = classifier['weight'].shape[0]
    if classes != num_classes:
        raise InputError(
            f"{path}'s classifier has {classes} classes (head.weight "
            f'{tuple(classifier["weight"].shape)}), the data {num_classes}: evaluate it on the '
            f'data it was trained for (--data_path), or fine-tune it (drop --eval)'
        )
    global_pool = 'fc_norm.weight' in state_dict or 'cls_token' not in state_dict
    return classifier, global_pool


def load_classifier(model, classifier: dict) -> None:
    """The file's classifier into model.head, a Linear (D -> C) in place of the fresh one."""
    num_classes, dim = classifier['weight'].shape
    head = torch.nn.Linear(dim, num_classes)
    head.load_state_dict(classifier)
    model.head = head
