"""Supervised training and evaluation: fine-tuning and linear probing, top-1/top-5, feature
extraction and DINO's weighted kNN (main_linprobe.py, and main_pretrain.py's kNN monitor)."""

import copy

import torch
from timm.utils import accuracy
from torch.utils.data import TensorDataset, default_collate

import engine
from util import data, misc, transforms
from util.errors import InputError
from util.features import center_normalize, knn_scores, logistic_regression, topk_accuracy
from util.logging import MetricLogger, SmoothedValue, epoch_stats, training_logger


def train_one_epoch(
    model: torch.nn.Module,
    criterion,
    data_loader,
    loop: engine.LoopSettings,
    epoch: int,
    *,
    mixup_fn=None,
    model_ema=None,
) -> dict:
    """One epoch of a classifier trained through `criterion`; returns the average loss and lr.

    `mixup_fn` (timm's Mixup) mixes each batch and its targets; `model_ema` (timm's ModelEmaV3)
    follows the weights after each update. `loop` as in engine_pretrain.train_one_epoch.
    """
    logger = training_logger()
    batches = len(data_loader)
    steps = engine.accumulation_steps(model, data_loader, loop, logger, epoch)
    for step, (inputs, targets), need_update, batches_in_update in steps:
        inputs = misc.to_device(inputs, loop.device)
        targets = targets.to(loop.device, non_blocking=True)

        # The backward too runs under the sync context: DDP reduces the gradients in it.
        with engine.gradient_sync(model, need_update):
            with misc.autocast(loop.device, loop.amp):
                if mixup_fn is not None:
                    inputs, targets = mixup_fn(inputs, targets)
                loss = criterion(model(inputs), targets)
            loop.scaler.scale(loss / batches_in_update).backward()

        if need_update:
            engine.optimizer_update(model, loop)
            if model_ema is not None:
                model_ema.update(model)
        engine.log_step(logger, loop, loss, {}, step, batches, epoch)

    return epoch_stats(logger, epoch, loop.log_writer)


@torch.no_grad()
def evaluate(model, data_loader, device, amp: str = 'none', print_freq: int = 20) -> dict:
    """Top-1/top-5 accuracy (%) and cross-entropy of a classifier on a labelled loader."""
    model.eval()
    logger = MetricLogger()
    # Created up front, so that a process whose shard holds no image still reports them.
    for name in ('loss', 'acc1', 'acc5'):
        logger.meters[name] = SmoothedValue()
    for images, targets in logger.log_every(data_loader, print_freq, 'Test:'):
        images = misc.to_device(images, device)
        targets = targets.to(device, non_blocking=True)
        with misc.autocast(device, amp):
            output = model(images)
            loss = torch.nn.functional.cross_entropy(output, targets)
        top5 = min(5, output.shape[1])
        acc1, acc5 = accuracy(output, targets, topk=(1, top5))
        batch_size = images.shape[0]
        logger.meters['loss'].update(loss.item(), batch_size)
        logger.meters['acc1'].update(acc1.item(), batch_size)
        logger.meters['acc5'].update(acc5.item(), batch_size)
    logger.synchronize_between_processes()
    stats = logger.averages()
    print(f'* Acc@1 {stats["acc1"]:.3f} Acc@5 {stats["acc5"]:.3f} loss {stats["loss"]:.3f}')
    return stats


@torch.no_grad()
def extract_features(backbone, dataset, device, loader_args) -> tuple:
    """(features (N, D) float32, labels (N,)) of a whole data set in its order, on every process.

    `loader_args` holds the loader's settings (batch_size, num_workers, seed), --amp and
    --print_freq. The features are the backbone's pooled output before any classifier.
    """
    loader = data.build_loader(dataset, loader_args, is_train=False)
    # An empty start: a process may get no image.
    features = [torch.empty(0, backbone.num_features, device=device)]
    labels = [torch.empty(0, dtype=torch.long, device=device)]
    for images, targets in MetricLogger().log_every(loader, loader_args.print_freq, 'Features:'):
        images = images.to(device, non_blocking=True)
        with misc.autocast(device, loader_args.amp):
            tokens = backbone.forward_features(images)
            pooled = backbone.forward_head(tokens, pre_logits=True)  # (B, D)
        features.append(pooled.float())
        labels.append(targets.to(device))
    features = data.gather_shards(torch.cat(features), len(dataset))
    labels = data.gather_shards(torch.cat(labels), len(dataset))
    return features, labels


def knn_evaluate(
    backbone,
    train_set,
    val_set,
    device,
    loader_args,
    k: int = 20,
    t: float = 0.07,
    chunk: int = 256,
) -> dict:
    """Top-1/top-5 (%) of DINO's weighted kNN on the val set, `train_set` the bank.

    The backbone runs in eval() (no drop path: no RNG drawn, so an exact resume stays exact) and
    returns to its mode after.
    """
    was_training = backbone.training
    backbone.eval()
    train_x, train_y = extract_features(backbone, train_set, device, loader_args)
    val_x, val_y = extract_features(backbone, val_set, device, loader_args)
    backbone.train(was_training)
    num_classes = len(val_set.classes)
    scores = knn_scores(train_x, train_y, val_x, num_classes, k, t, chunk)
    top1, top5 = topk_accuracy(scores, val_y, topk=(1, min(5, num_classes)))
    return {'acc1': top1, 'acc5': top5}


def check_knn_args(args) -> None:
    """InputError unless --knn_k and --knn_chunk are at least 1 and --knn_t positive."""
    if args.knn_k < 1 or args.knn_t <= 0 or args.knn_chunk < 1:
        raise InputError(
            f'--knn_k {args.knn_k}, --knn_t {args.knn_t}, --knn_chunk {args.knn_chunk}: '
            f'k and the chunk must be at least 1 and the temperature positive'
        )


def knn_datasets(args, dataset) -> tuple:
    """main_pretrain.py's kNN monitor's bank (the training images) and queries (val), both with
    the eval transform."""
    bank = copy.copy(dataset)  # the same images (no second scan of a folder), another transform
    bank.transform = transforms.eval_transform(args)
    val = data.build_dataset(args, is_train=False, transform=transforms.eval_transform(args))
    if data.dataset_name(args) != 'digits':
        return bank, val
    # Digits: transformed once here, not at each evaluation (a third of its time; no random draw).
    return as_tensors(bank), as_tensors(val)


def as_tensors(images) -> TensorDataset:
    """A data set whose samples are fixed, as a TensorDataset: (N, C, H, W) images, (N,) labels."""
    samples = [images[i] for i in range(len(images))]
    cached = TensorDataset(*default_collate(samples))
    cached.classes = images.classes
    return cached


def logistic_regression_accuracy(backbone, train_set, val_set, num_classes, device, args) -> dict:
    """Layer Grafted's few-shot protocol: L-BFGS logistic regression on centred, normalised
    features."""
    train_x, train_y = extract_features(backbone, train_set, device, args)
    val_x, val_y = extract_features(backbone, val_set, device, args)
    train_x, val_x = center_normalize(train_x, val_x)
    weight_decay = args.logreg_wd
    if weight_decay is None:
        weight_decay = 2.5e-4 / len(train_set)
    classifier = logistic_regression(train_x, train_y, num_classes, weight_decay, args.logreg_iters)
    scores = classifier(val_x.double())
    top1, top5 = topk_accuracy(scores, val_y, topk=(1, min(5, num_classes)))
    return {'acc1': top1, 'acc5': top5}
