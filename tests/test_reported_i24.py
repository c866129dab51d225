"""Issue 24's user reports, rebuilt as small inputs: a published classifier file scored with its own
head, load errors that name the keys and shapes, hidden folders that are no classes, and a
checkpoint save on a full disk."""

import argparse
import errno
import os

import pytest
import timm
import torch

import main_finetune
import main_linprobe
from tests.test_eval import run
from tests.test_reported import image_folder
from util import checkpoint, data, transforms
from util.architectures import DIGITS_MODEL
from util.errors import InputError, run_main

FINETUNE = '--num_workers 0 --print_freq 1000 --batch_size 128 --epochs 1 --warmup_epochs 0'

# Every test here on one torch thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures('one_thread')


def finetune_argv(out, *extra) -> list:
    return FINETUNE.split() + ['--output_dir', str(out)] + [str(a) for a in extra]


@pytest.fixture(scope='module')
def classifier_files(tmp_path_factory):
    """A DeiT-style classifier of the digits (CLS token, head.*, 10 classes) in DeiT's release
    layout {'model'} and its training layout {'model', 'optimizer', 'epoch', 'args' (Namespace)},
    and the val top-1 that the model itself scores."""
    root = tmp_path_factory.mktemp('classifiers')
    torch.manual_seed(3)
    model = timm.create_model(DIGITS_MODEL, num_classes=10, global_pool='token').eval()
    torch.nn.init.normal_(model.head.bias, std=1.0)  # a head no fresh init would reproduce
    state = model.state_dict()
    release = root / 'deit_release.pth'
    torch.save({'model': state}, release)
    training = root / 'deit_checkpoint.pth'
    saved_args = argparse.Namespace(model='deit_tiny_patch16_224', lr=5e-4)
    torch.save({'model': state, 'optimizer': {}, 'epoch': 299, 'args': saved_args}, training)
    args = argparse.Namespace(data_path=None, input_size=16)
    val_set = data.build_dataset(args, False, transforms.eval_transform(args))
    images = torch.stack([val_set[i][0] for i in range(len(val_set))])
    labels = torch.tensor([val_set[i][1] for i in range(len(val_set))])
    with torch.no_grad():
        expected = (model(images).argmax(1) == labels).float().mean().item() * 100
    return release, training, expected


@pytest.mark.parametrize('flag', ['--resume', '--finetune'])
@pytest.mark.parametrize('layout', [0, 1])
def test_eval_scores_a_classifier_files_own_head(tmp_path, classifier_files, flag, layout):
    path = classifier_files[layout]
    argv = finetune_argv(tmp_path, '--eval', flag, path, '--model', DIGITS_MODEL)
    metrics = run(main_finetune, *argv)
    assert metrics['acc1'] == pytest.approx(classifier_files[2], abs=1e-3)


def test_eval_refuses_a_backbone_or_another_class_count(tmp_path, classifier_files):
    model = timm.create_model(DIGITS_MODEL, num_classes=7, global_pool='token')
    seven = tmp_path / 'seven.pth'
    torch.save({'model': model.state_dict()}, seven)
    with pytest.raises(InputError, match=r'has 7 classes \(head.weight \(7, 128\)\), the data 10'):
        run(main_finetune, *finetune_argv(tmp_path, '--eval', '--finetune', seven))
    backbone = tmp_path / 'backbone.pth'
    torch.save(timm.create_model(DIGITS_MODEL, num_classes=0).state_dict(), backbone)
    with pytest.raises(InputError, match='holds no classifier'):
        run(main_finetune, *finetune_argv(tmp_path, '--eval', '--finetune', backbone))


@pytest.fixture(scope='module')
def finetuned(tmp_path_factory):
    """One epoch of main_finetune.py on digits: its checkpoint-last.pth."""
    out = tmp_path_factory.mktemp('finetuned')
    run(main_finetune, *finetune_argv(out))
    return out / 'checkpoint-last.pth'


def test_resume_strips_module_prefix_and_names_a_head_mismatch(tmp_path, finetuned):
    saved = torch.load(finetuned, weights_only=True)
    saved['model'] = {f'module.{k}': v for k, v in saved['model'].items()}  # saved from DDP
    wrapped = tmp_path / 'wrapped.pth'
    torch.save(saved, wrapped)
    metrics = run(main_finetune, *finetune_argv(tmp_path / 'a', '--resume', wrapped, '--epochs', 2))
    assert metrics['acc1'] is not None
    saved['model'] = {k.removeprefix('module.'): v for k, v in saved['model'].items()}
    saved['model']['head.weight'] = saved['model']['head.weight'][:5]
    saved['model']['head.bias'] = saved['model']['head.bias'][:5]
    five = tmp_path / 'five.pth'
    torch.save(saved, five)
    with pytest.raises(InputError) as raised:
        run(main_finetune, *finetune_argv(tmp_path / 'b', '--resume', five, '--epochs', 2))
    message = str(raised.value)
    assert 'head.weight (5, 128) in the file vs (10, 128) in the model' in message
    assert 'another class count' in message and '\n' not in message


def test_hidden_folders_are_no_classes(tmp_path, capsys):
    root = image_folder(tmp_path)
    for split in ('train', 'val'):
        hidden = tmp_path / split / '.ipynb_checkpoints'
        os.makedirs(hidden)
        (hidden / 'a0-checkpoint.png').write_bytes((tmp_path / split / 'a' / 'a0.png').read_bytes())
    args = argparse.Namespace(data_path=root, dataset='auto')
    train_set = data.build_dataset(args, True, None)
    val_set = data.build_dataset(args, False, None)
    assert train_set.classes == val_set.classes == ['a', 'b', 'c']
    assert len(train_set) == 18 and len(val_set) == 6
    said = [line for line in capsys.readouterr().out.splitlines() if 'hidden folder' in line]
    assert len(said) == 2 and all('.ipynb_checkpoints' in line for line in said)  # train/, val/


@pytest.mark.parametrize(
    'code, words',
    [(errno.ENOSPC, 'the disk is full'), (errno.EACCES, 'the folder is not writable')],
)
def test_failed_save_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys, code, words):
    """The second epoch's save fails halfway: no temporary file left, one line saying what failed,
    exit 2, checkpoint-last.pth still epoch 0's; the rerun resumes from it."""
    real_save = torch.save
    calls = []

    def fail_second_save(state, path):
        calls.append(path)
        if len(calls) < 2:
            return real_save(state, path)
        with open(path, 'wb') as f:
            f.write(b'PK partial')  # what a full disk leaves of a zip file
        raise OSError(code, os.strerror(code))

    out = tmp_path / 'probe'
    argv = '--epochs 3 --warmup_epochs 0 --num_workers 0 --print_freq 1000'.split()
    args = argparse.ArgumentParser(parents=[main_linprobe.get_args_parser()])
    monkeypatch.setattr(checkpoint.torch, 'save', fail_second_save)
    with pytest.raises(SystemExit) as exited:
        run_main(main_linprobe.main, args.parse_args(argv + ['--output_dir', str(out)]))
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and 'checkpoint-last.pth' in err[0], err
    left = os.listdir(out)
    assert 'checkpoint-last.pth' in left and not [name for name in left if '.tmp.' in name]
    assert checkpoint.load_file(str(out / 'checkpoint-last.pth'))['epoch'] == 0
    monkeypatch.setattr(checkpoint.torch, 'save', real_save)
    metrics = main_linprobe.main(args.parse_args(argv + ['--output_dir', str(out)]))
    assert 'resumed from' in capsys.readouterr().out and metrics['acc1'] > 10
    assert checkpoint.load_file(str(out / 'checkpoint-last.pth'))['epoch'] == 2
