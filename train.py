#!/usr/bin/env python3
""" timm-gpd training script

Trains a timm classifier plainly, with knowledge distillation from a static
teacher, or with Gap Preserving Distillation (GPD: a dynamic teacher widened from
the student and trained alongside it). Argument names follow timm's train.py;
Accelerate places the work on CPU / GPU / several processes:

    python train.py --data-dir data --dataset torch/fashion_mnist --model resnet18 --gpd
    python train.py --data-dir data --dataset torch/fashion_mnist --model gpd_resnet18   # the same: GPD of resnet18
    accelerate launch --multi_gpu --num_processes 4 train.py -c configs/gpd_resnet18_imagenet.yaml --data-dir ...

Outputs (see docs/CONTRACTS.md) go to `--output/EXPERIMENT/`: args.yaml, summary.csv,
last.pth, model_best.pth and, at the end, the extracted student as
student.safetensors + config.json (timm Hub layout).
"""
import argparse
import csv
import logging
import os
import random
import sys
import time
from contextlib import contextmanager
from copy import copy, deepcopy
from datetime import datetime
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import DistributedType, gather_object, set_seed
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import timm
from timm.data import Mixup, create_dataset, create_transform, resolve_data_config
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.models import load_checkpoint, resolve_model_input_args, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, ParseKwargs, distribute_bn, get_outdir

from timm_gpd.checkpoint import (
    CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError, exit_on_sigterm, non_finite_tensors,
    read_weights, run_environment, state_dict_of)
from timm_gpd import checkpoint as gpd_checkpoint
from timm_gpd.device_augment import DeviceAugment, DeviceTrainLoader, cached_transform, images_of
from timm_gpd.losses import DynamicTeacherKD, kd_loss_from_name
from timm_gpd.models import create_gpd_student, gpd_student_arch, is_gpd_model_name, wrap_gpd_student
from timm_gpd.precise_bn import recompute_bn_stats
from timm_gpd.task import RenormalizedTeacher, TrainTask

_logger = logging.getLogger('train')

LOSS_PARTS = ('student_ce', 'student_kd', 'student_dt', 'dt_ce', 'dt_kd')
EVAL_METRICS = ('loss', 'top1', 'top5', 'dt_top1', 'dt_top5', 'ema_top1', 'ema_top5', 'gap_top1')
SUMMARY_COLUMNS = (
    'epoch', 'lr', 'train_loss', *(f'train_{p}' for p in LOSS_PARTS),
    'eval_loss', 'eval_top1', 'eval_top5', 'eval_dt_top1', 'eval_dt_top5', 'eval_ema_top1', 'eval_ema_top5',
    'eval_gap_top1', *(f'test_{k}' for k in EVAL_METRICS), 'epoch_time',
)
# arguments that define the learning-rate schedule: a resumed run keeps the saved
# scheduler state only if none of them changed
SCHEDULE_ARGS = ('sched', 'epochs', 'lr', 'min_lr', 'warmup_lr', 'warmup_epochs', 'cooldown_epochs',
                 'decay_epochs', 'decay_milestones', 'decay_rate', 'patience_epochs', 'sched_on_updates')


class UsageError(Exception):
    """ A problem with the arguments or input files, reported without a traceback. """


class TrainingDiverged(Exception):
    """ A non-finite loss or weights: training stops, the last good checkpoint stays, nothing is exported. """


# The first parser only finds the config file; its values become defaults of the main parser.
config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML config file specifying default arguments')


def build_parser() -> argparse.ArgumentParser:
    # built per call: set_defaults() from a config file must not leak into the next parse
    parser = argparse.ArgumentParser(description='timm-gpd training', parents=[config_parser])

    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('data', nargs='?', metavar='DIR', const=None,
                       help='path to dataset (positional is *deprecated*, use --data-dir)')
    group.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='dataset type + name ("<type>/<name>"), e.g. torch/fashion_mnist; empty = image folder')
    group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split')
    group.add_argument('--val-split', metavar='NAME', default='validation', help='dataset validation split')
    group.add_argument('--dataset-download', action='store_true', default=False,
                       help='allow download of dataset for torch/ and tfds/ datasets that support it')
    group.add_argument('--train-limit', type=int, default=None, metavar='N', help='train on the first N images only')
    group.add_argument('--val-limit', type=int, default=None, metavar='N', help='validate on the first N images only')
    group.add_argument('--val-holdout', type=int, default=0, metavar='N',
                       help='validate on the last N images of --train-split (held out of training) and '
                            'evaluate --val-split every epoch as a test set: its test_* columns in '
                            'summary.csv are never used for a choice (best checkpoint, plateau schedule)')

    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='resnet18', type=str, metavar='MODEL',
                       help='the student: a stock timm name (GPD with --gpd), or a gpd_* name (always GPD, '
                            'e.g. gpd_resnet18 trains resnet18)')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help='start the student from pretrained weights (for gpd_* names: those of the tag, '
                            'e.g. gpd_resnet18 -> resnet18.a1_in1k)')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='extra student constructor kwargs, KEY=VALUE ... (timm\'s create_model kwargs)')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                       help='load this stock-student checkpoint before training (fine-tune)')
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help='resume training from a timm-gpd checkpoint')
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='do not restore the optimizer state when resuming')
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='number of label classes (default: from the dataset)')
    group.add_argument('--in-chans', type=int, default=None, metavar='N',
                       help='image input channels; 1 for grayscale (default: 3, grayscale images are repeated)')
    group.add_argument('--img-size', type=int, default=None, metavar='N', help='image size (default: model default)')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                       help='input all image dimensions (d h w, e.g. --input-size 3 224 224)')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N',
                       help='input image center crop percent (eval)')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='override mean pixel value')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='override std deviation')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME', help='image resize interpolation type')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='input batch size per process')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                       help='validation batch size (default: --batch-size)')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop path rate')
    group.add_argument('--grad-checkpointing', action='store_true', default=False,
                       help='activation checkpointing (of the DT under --gpd: see GPDModel.set_grad_checkpointing)')
    group.add_argument('--channels-last', action='store_true', default=False,
                       help='use channels_last memory layout')
    group.add_argument('--sync-bn', action='store_true', default=False,
                       help='synchronized BatchNorm across processes (torch SyncBatchNorm: GPU processes only)')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                       help='compile the model with torch.compile and this backend (default: inductor), '
                            'through Accelerate')

    group = parser.add_argument_group('Static teacher / KD parameters')
    group.add_argument('--teacher', default='', type=str, metavar='MODEL', help='static teacher timm model name')
    group.add_argument('--teacher-checkpoint', default='', type=str, metavar='PATH',
                       help='static teacher weights (default: the pretrained weights of --teacher)')
    group.add_argument('--kd-loss', default='dkd', choices=('kd', 'dkd'), help='static-teacher distillation loss')
    group.add_argument('--kd-alpha', type=float, default=1.0,
                       help='weight of KD (kd) or of its target-class part (dkd)')
    group.add_argument('--kd-beta', type=float, default=0.5, help='weight of the non-target-class part (dkd)')
    group.add_argument('--kd-temperature', type=float, default=1.0,
                       help='distillation temperature (KD, DKD and DT term)')

    group = parser.add_argument_group('GPD parameters')
    group.add_argument('--gpd', action='store_true', default=False,
                       help='train with a dynamic teacher (Gap Preserving Distillation)')
    group.add_argument('--gpd-ratio', type=float, default=2.0, help='width ratio of the dynamic teacher')
    group.add_argument('--no-gpd-cbr', action='store_true', default=False,
                       help='no channel-branch reparameterization of the student convs')
    group.add_argument('--gpd-cbr-only', action='store_true', default=False,
                       help='CBR student without a dynamic teacher (ablation)')
    group.add_argument('--gpd-noise', type=float, default=0.01, help='function-preserving symmetry-breaking noise')
    group.add_argument('--gpd-seed', type=int, default=0, help='seed of the symmetry-breaking noise')
    group.add_argument('--gpd-decouple-student', action='store_true', default=False,
                       help='ablation: divide the student\'s gradient on each shared DT tensor by the square '
                            'of its view\'s copy count, so its own loss moves it at --lr rather than '
                            'ratio**2 x --lr (the published method couples them)')
    group.add_argument('--gpd-dt-weight', type=float, default=3.0, help='weight of the DT -> student term')

    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='optimizer (timm name)')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='optimizer epsilon')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='optimizer momentum')
    group.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM',
                       help='clip gradient norm (default: 5 with --gpd, else none)')
    group.add_argument('--layer-decay', type=float, default=None,
                       help='layer-wise learning rate decay (default: None)')
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='the number of steps to accumulate gradients (default: 1)')

    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER', help='LR scheduler')
    group.add_argument('--sched-on-updates', action='store_true', default=False, help='step the schedule per update')
    group.add_argument('--lr', type=float, default=None, metavar='LR',
                       help='learning rate (default: --lr-base scaled by global batch size)')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR', help='base learning rate at --lr-base-size')
    group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV', help='batch size of --lr-base')
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR', help='warmup learning rate')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR', help='lower lr bound for cyclic schedulers')
    group.add_argument('--epochs', type=int, default=100, metavar='N', help='number of epochs to train')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                       help='epochs for the multistep scheduler')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval to decay LR')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N', help='epochs to warmup LR')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N', help='epochs to cooldown LR at min_lr')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N', help='patience epochs for Plateau')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='LR decay rate')

    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False, help='disable all training augmentation')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT', help='random resize scale')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='random resize aspect ratio')
    group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip training aug probability')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='color jitter factor')
    group.add_argument('--aa', type=str, default=None, metavar='NAME',
                       help='AutoAugment / RandAugment policy, e.g. "rand-m9-mstd0.5-inc1" or "v0" (default: None)')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erase prob (default: 0.)')
    group.add_argument('--remode', type=str, default='pixel', help='random erase mode (default: "pixel")')
    group.add_argument('--recount', type=int, default=1, help='random erase count (default: 1)')
    group.add_argument('--device-augment', action='store_true', default=False,
                       help='keep an in-memory dataset (torch/mnist, torch/fashion_mnist, torch/cifar10/100) on '
                            'the training device and augment it there, a batch at a time, instead of in loader '
                            'workers (random resized crop, flip, color jitter, random erasing; not --aa); '
                            'evaluation transforms run once')
    group.add_argument('--mixup', type=float, default=0.0,
                       help='mixup alpha, mixup enabled if > 0. (default: 0.)')
    group.add_argument('--cutmix', type=float, default=0.0,
                       help='cutmix alpha, cutmix enabled if > 0. (default: 0.)')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                       help='cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)')
    group.add_argument('--mixup-prob', type=float, default=1.0,
                       help='probability of performing mixup or cutmix when either/both is enabled')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                       help='probability of switching to cutmix when both mixup and cutmix enabled')
    group.add_argument('--mixup-mode', type=str, default='batch', choices=('batch', 'pair', 'elem'),
                       help='how to apply mixup/cutmix params: per "batch", "pair", or "elem"')
    group.add_argument('--mixup-off-epoch', type=int, default=0, metavar='N',
                       help='turn off mixup after this epoch, disabled if 0 (default: 0)')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')

    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False, help='track an EMA of the model weights')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='decay factor for model weights EMA')
    group.add_argument('--model-ema-warmup', action='store_true', default=False,
                       help='enable warmup for model EMA decay')

    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed')
    group.add_argument('--log-interval', type=int, default=50, metavar='N', help='batches between log lines')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data loading processes per process')
    group.add_argument('--amp', action='store_true', default=False,
                       help='mixed precision: bfloat16 on CPU, --amp-dtype on GPU')
    group.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'), help='AMP dtype on GPU')
    group.add_argument('--pin-mem', action='store_true', default=False, help='pin CPU memory in the DataLoader')
    group.add_argument('--output', default='', type=str, metavar='PATH', help='output folder (default: ./output)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help='experiment name (default: date-time-model; with --resume: the checkpoint folder)')
    group.add_argument('--precise-bn', type=int, default=0, metavar='BATCHES',
                       help='before every validation, recompute the BatchNorm running statistics of the '
                            'student (and DT) over the first BATCHES training batches, eval transforms '
                            '(0: off; the EMA model keeps its own)')
    group.add_argument('--dist-bn', type=str, default='reduce', choices=('reduce', 'broadcast', ''),
                       help='before eval, average ("reduce") or copy from rank 0 ("broadcast") BatchNorm stats')
    group.add_argument('--checkpoint-hist', type=int, default=0, metavar='N',
                       help='also keep the N best epochs as checkpoint-EPOCH.pth (by --eval-metric; 0: off, '
                            'timm\'s default is 10)')
    group.add_argument('--log-wandb', action='store_true', default=False,
                       help='log training and validation metrics to wandb (needs `pip install wandb`)')
    group.add_argument('--eval-metric', default='top1',
                       choices=('top1', 'top5', 'loss', 'dt_top1', 'dt_top5', 'gap_top1'),
                       help='metric that picks model_best.pth (of the EMA student with --model-ema)')
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args_config, remaining = config_parser.parse_known_args(argv)
    if args_config.config:
        with open(args_config.config) as f:
            cfg = yaml.safe_load(f) or {}
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - known)
        if unknown:
            parser.error(f'unknown key(s) in {args_config.config}: {", ".join(unknown)}')
        parser.set_defaults(**cfg)
    args = parser.parse_args(remaining)
    args.config = args_config.config
    args.data_dir = args.data_dir or args.data
    if args.input_size is not None:
        if args.in_chans is not None and args.in_chans != args.input_size[0]:
            parser.error(f'--in-chans {args.in_chans} disagrees with --input-size {args.input_size}')
        args.in_chans = args.input_size[0]
    check_model_args(parser, args)
    check_recipe_args(parser, args)
    if args.clip_grad is None and args.gpd:
        args.clip_grad = 5.0
    if args.precise_bn < 0:
        parser.error(f'--precise-bn takes a number of batches >= 0, got {args.precise_bn}')
    if args.gpd_cbr_only and not args.gpd:
        parser.error('--gpd-cbr-only needs --gpd')
    if args.teacher_checkpoint and not args.teacher:
        parser.error('--teacher-checkpoint needs --teacher MODEL')
    if args.pretrained and args.initial_checkpoint:
        parser.error('use either --pretrained or --initial-checkpoint, not both')
    return args


def check_model_args(parser, args):
    """ A gpd_* --model means GPD training of its student; the wrapper's options come from the
    --gpd-* flags only, so no two flags can disagree about them. """
    if is_gpd_model_name(args.model):
        args.gpd = True
    passed = sorted(k for k in args.model_kwargs if k.startswith('gpd_'))
    if passed:
        flags = {'gpd_ratio': '--gpd-ratio', 'gpd_cbr': '--no-gpd-cbr', 'gpd_cbr_only': '--gpd-cbr-only',
                 'gpd_noise': '--gpd-noise', 'gpd_seed': '--gpd-seed',
                 'gpd_cbr_init': '--pretrained / --initial-checkpoint (fine-tune init)'}
        parser.error(f'--model-kwargs {", ".join(passed)}: the GPD wrapper is set by the --gpd-* flags, use '
                     + ', '.join(flags.get(k, k) for k in passed) + ' instead')
    if args.gpd_cbr_only and args.no_gpd_cbr:
        parser.error('--gpd-cbr-only trains the student with CBR branches alone: it cannot go with --no-gpd-cbr')


def zero_bit_posterize_possible(aa: str) -> bool:
    """ A RandAugment policy whose increasing posterize (-inc1) can draw magnitude 10 (timm's default
    cap): 4 - int(level / 10 * 4) bits = 0 there. """
    parts = aa.split('-')
    if parts[0] != 'rand' or 'inc1' not in parts[1:]:
        return False
    opts = {p.rstrip('0123456789.'): p[len(p.rstrip('0123456789.')):] for p in parts[1:]}
    magnitude = float(opts.get('m') or 10)
    cap = float(opts.get('mmax') or 10)
    return cap >= 10 and (magnitude >= 10 or float(opts.get('mstd') or 0) != 0)


def pillow_refuses_zero_bit_posterize() -> bool:
    from PIL import Image, ImageOps
    try:
        ImageOps.posterize(Image.new('L', (1, 1)), 0)
    except ValueError:
        return True
    return False


def check_recipe_args(parser, args):
    if args.grad_accum_steps < 1:
        parser.error(f'--grad-accum-steps takes a number of steps >= 1, got {args.grad_accum_steps}')
    if args.device_augment and args.aa:
        parser.error(f'--device-augment draws crops, flips, color jitter and random erasing, not --aa {args.aa}')
    if args.device_augment and args.grad_accum_steps > 1:
        parser.error('--device-augment trains with --grad-accum-steps 1 (its loader is not Accelerate\'s)')
    if mixup_active(args) and args.batch_size % 2:
        parser.error(f'--mixup / --cutmix mix pairs of images: --batch-size must be even, got {args.batch_size}')
    if args.checkpoint_hist < 0:
        parser.error(f'--checkpoint-hist takes a number of checkpoints >= 0, got {args.checkpoint_hist}')
    if args.aa and zero_bit_posterize_possible(args.aa) and pillow_refuses_zero_bit_posterize():
        parser.error(f'--aa {args.aa}: timm\'s PosterizeIncreasing asks Pillow for 0 bits at magnitude 10, which '
                     'this Pillow refuses (a ValueError mid-epoch); keep the magnitude below 10 with -mmax9 '
                     '(e.g. rand-m9-mstd0.5-inc1-mmax9) or drop -inc1')
    if args.log_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            parser.error('--log-wandb needs the wandb package, which is not installed (pip install wandb)')


# ---------------------------------------------------------------- checkpoints

def read_checkpoint(path: str, what: str = 'checkpoint') -> dict:
    """ The content of a .pth / .safetensors file (weights_only), or a one-line UsageError. """
    try:
        return read_weights(path, what)
    except CheckpointError as e:
        raise UsageError(str(e)) from e


def read_training_checkpoint(path: str) -> dict:
    try:
        return gpd_checkpoint.load_checkpoint(
            path, 'resume checkpoint', training=True, hint='to start from plain weights use --initial-checkpoint')
    except CheckpointError as e:
        raise UsageError(str(e)) from e


def save_atomic(obj, path: str):
    # a reader (or a resume after a kill) sees the old file or the new one, never half of one
    gpd_checkpoint.save_atomic(obj, path)


def get_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        'python': random.getstate(),
        # plain lists: numpy arrays are not allowed by weights_only loading
        'numpy': [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state['python'])
    name, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# ---------------------------------------------------------------- data

class ConvertImageMode:
    """ PIL mode conversion ahead of timm's transforms: 'L' for --in-chans 1, else 'RGB'
    (which repeats a grayscale channel). """

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self):
        return f'{self.__class__.__name__}(mode={self.mode})'


def class_names(dataset) -> Optional[List[str]]:
    names = getattr(dataset, 'classes', None)  # torchvision datasets
    if names is None:
        class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)  # timm folder datasets
        if class_to_idx:
            names = sorted(class_to_idx, key=class_to_idx.get)
    return [str(n) for n in names] if names else None


def build_datasets(args):
    if not args.data_dir and not args.dataset_download:
        raise UsageError('no dataset root: pass --data-dir DIR')
    common = dict(root=args.data_dir, download=args.dataset_download, batch_size=args.batch_size)
    try:
        train_ds = create_dataset(args.dataset, split=args.train_split, is_training=True, **common)
        val_ds = create_dataset(args.dataset, split=args.val_split, is_training=False, **common)
    except (RuntimeError, FileNotFoundError) as e:
        hint = ' (for Fashion-MNIST run scripts/get_fashion_mnist.sh DIR first)' if 'mnist' in args.dataset else ''
        raise UsageError(f'cannot open dataset {args.dataset or "folder"!r} in {args.data_dir}: {e}{hint}') from e
    return train_ds, val_ds


def set_transform(dataset, transform, limit: Optional[int], start: int = 0, stop: Optional[int] = None):
    """ The images [start, stop) of ``dataset`` under ``transform``, at most the first ``limit`` of them. """
    dataset.transform = transform
    stop = len(dataset) if stop is None else stop
    if limit is not None:
        if limit < 1:
            raise UsageError(f'subset limits must be >= 1, got {limit}')
        stop = min(stop, start + limit)
    if (start, stop) != (0, len(dataset)):
        dataset = torch.utils.data.Subset(dataset, range(start, stop))
    return dataset


def holdout_bounds(args, num_images: int) -> int:
    """ --val-holdout: index of the first held-out training image. """
    if args.val_holdout < 0:
        raise UsageError(f'--val-holdout must be >= 0, got {args.val_holdout}')
    if args.val_holdout >= num_images:
        raise UsageError(f'--val-holdout {args.val_holdout} leaves no training image: the {args.train_split!r} '
                         f'split has {num_images}')
    return num_images - args.val_holdout


def resolve_data(args, model: nn.Module) -> dict:
    data_config = resolve_data_config(vars(args), model=model)
    in_chans = data_config['input_size'][0]
    for key in ('mean', 'std'):
        if len(data_config[key]) != in_chans:
            # e.g. ImageNet RGB statistics for a grayscale model: the channel average
            # matches timm's summing of pretrained RGB stem weights into one channel
            data_config[key] = (float(np.mean(data_config[key])),) * in_chans
    return data_config


# ---------------------------------------------------------------- models

def load_student_weights(student: nn.Module, path: str):
    """ --initial-checkpoint: stock student weights (timm/our checkpoint, state dict or safetensors). """
    ckpt = read_checkpoint(path, 'initial checkpoint')  # a bad file: a one-line error, not timm's traceback
    if isinstance(ckpt, dict) and ckpt.get('gpd'):
        raise UsageError(
            f'{path} is a GPD training checkpoint; start a fine-tune from the stock student it '
            'produced (student.safetensors in the same folder)')
    try:
        load_checkpoint(student, path, use_ema=True, strict=True)
    except (RuntimeError, KeyError) as e:
        raise UsageError(f'initial checkpoint {path} does not fit {type(student).__name__} '
                         f'({str(e).splitlines()[0]})') from e


def classifier_out_features(state_dict: dict, model: nn.Module) -> Optional[int]:
    head = model.pretrained_cfg.get('classifier')
    heads = head if isinstance(head, (list, tuple)) else [head]
    for h in heads:
        w = state_dict.get(f'{h}.weight')
        if w is not None:
            return w.shape[0]
    return None


def create_static_teacher(args, num_classes: int, in_chans: int) -> nn.Module:
    if not args.teacher_checkpoint:
        # pretrained weights with their own head: only useful when the label sets agree
        teacher = timm.create_model(args.teacher, pretrained=True, in_chans=in_chans)
        if teacher.num_classes != num_classes:
            raise UsageError(
                f'teacher {args.teacher} (pretrained) has {teacher.num_classes} classes but the student has '
                f'{num_classes}; pass --teacher-checkpoint trained on this dataset')
        return teacher

    teacher = timm.create_model(args.teacher, num_classes=num_classes, in_chans=in_chans)
    ckpt = read_checkpoint(args.teacher_checkpoint, 'teacher checkpoint')  # .pth or .safetensors
    if isinstance(ckpt, dict) and ckpt.get('gpd'):
        raise UsageError(
            f'teacher checkpoint {args.teacher_checkpoint} is a GPD model; use its student.safetensors')
    state_dict = state_dict_of(ckpt, use_ema=True)
    if not isinstance(state_dict, dict):
        raise UsageError(f'teacher checkpoint {args.teacher_checkpoint} holds no state dict')
    teacher_classes = classifier_out_features(state_dict, teacher)
    if teacher_classes is not None and teacher_classes != num_classes:
        raise UsageError(
            f'teacher checkpoint {args.teacher_checkpoint} has {teacher_classes} classes but the student has '
            f'{num_classes}: a static teacher must predict the same classes')
    try:
        teacher.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise UsageError(f'teacher checkpoint {args.teacher_checkpoint} does not fit {args.teacher} '
                         f'(in_chans={in_chans}): {str(e).splitlines()[0]}') from e
    return teacher


def gpd_kwargs(args) -> dict:
    finetune = args.pretrained or bool(args.initial_checkpoint)
    return dict(
        ratio=args.gpd_ratio,
        cbr=not args.no_gpd_cbr,
        cbr_only=args.gpd_cbr_only,
        cbr_init='finetune' if finetune else 'scratch',
        noise=args.gpd_noise,
        seed=args.gpd_seed,
        decouple_student=args.gpd_decouple_student,
    )


def student_arch(args) -> str:
    """ The stock timm architecture trained: --model, or the student of a gpd_* --model. """
    return gpd_student_arch(args.model) if is_gpd_model_name(args.model) else args.model


def student_kwargs(args, num_classes: int) -> dict:
    kwargs = dict(num_classes=num_classes, in_chans=args.in_chans or 3, drop_rate=args.drop)
    if args.drop_path is not None:
        kwargs['drop_path_rate'] = args.drop_path
    if args.img_size is not None or args.input_size is not None:
        # only architectures built for one input size (ViT) take img_size as a constructor argument
        resolved = resolve_model_input_args(
            student_arch(args), args={'img_size': args.img_size, 'input_size': args.input_size}, **kwargs)
        if 'img_size' in resolved:
            kwargs['img_size'] = resolved['img_size']
    kwargs.update(args.model_kwargs)
    return kwargs


def create_student(args, num_classes: int, resuming: bool) -> nn.Module:
    """ The stock timm student; with --pretrained / --initial-checkpoint its starting weights. A gpd_*
    --model gives its student (pretrained: the weights its tag names). """
    pretrained = args.pretrained and not resuming  # a resumed run takes every weight from the checkpoint
    kwargs = student_kwargs(args, num_classes)
    try:
        if is_gpd_model_name(args.model):
            student = create_gpd_student(args.model, pretrained=pretrained, **kwargs)
        else:
            student = timm.create_model(args.model, pretrained=pretrained, **kwargs)
    except TypeError as e:  # e.g. a --model-kwargs key the architecture does not take
        raise UsageError(f'cannot build --model {args.model} with {kwargs}: {e}') from e
    if args.initial_checkpoint and not resuming:
        load_student_weights(student, args.initial_checkpoint)
    return student


def wrap_gpd(student: nn.Module, args) -> nn.Module:
    if is_gpd_model_name(args.model):
        return wrap_gpd_student(args.model, student, **gpd_kwargs(args))  # with the gpd_* model's cfg
    import timm_gpd  # the core is only needed for GPD runs
    return timm_gpd.GPDModel(student, **gpd_kwargs(args))


TRIAL_NUM_CLASSES = 10  # the head's size does not change what GPD can widen


def build_model(args, num_classes: int, resuming: bool):
    """ The model to train (a GPDModel under --gpd) and the student's data config; a GPD construction
    error (bad ratio, a module the rules cannot widen) is a one-line UsageError. """
    student = create_student(args, num_classes, resuming=resuming)
    data_config = resolve_data(args, student)
    if not args.gpd:
        return student, data_config
    try:
        return wrap_gpd(student, args), data_config
    except (ValueError, NotImplementedError, RuntimeError, TypeError) as e:
        raise UsageError(f'--model {args.model} --gpd: {" ".join(str(e).split())}') from e


def check_warmup(args):
    """ timm's schedulers hold the lr at the warmup ramp for --warmup-epochs: with as many epochs as
    that or fewer, --lr (and the schedule after warmup) would never be used. """
    if args.warmup_epochs > 0 and args.warmup_epochs >= args.epochs:
        raise UsageError(
            f'--warmup-epochs {args.warmup_epochs} >= --epochs {args.epochs}: the learning rate would stay on '
            f'the warmup ramp from --warmup-lr {args.warmup_lr} and never reach --lr; pass --warmup-epochs '
            f'below {args.epochs} (0: no warmup)')


def check_resume_compatible(args, ckpt: dict, num_classes: int):
    problems = []
    if ckpt['arch'] != student_arch(args):
        problems.append(f"it trains {ckpt['arch']}, not --model {args.model}")
    if bool(ckpt.get('gpd')) != args.gpd:
        problems.append('it was trained ' + ('with' if ckpt.get('gpd') else 'without') + ' --gpd')
    elif args.gpd:
        saved, now = ckpt['gpd'], gpd_kwargs(args)
        # cbr_init only decides the initial weights, which the checkpoint replaces
        diff = [f'{k}: {saved.get(k)} -> {v}' for k, v in now.items() if k != 'cbr_init' and saved.get(k) != v]
        if diff:
            problems.append('its GPD settings differ (' + ', '.join(diff) + ')')
    if ckpt['num_classes'] != num_classes:
        problems.append(f"it has {ckpt['num_classes']} classes, not {num_classes}")
    if ckpt['in_chans'] != (args.in_chans or 3):
        problems.append(f"it takes {ckpt['in_chans']} input channels, not {args.in_chans or 3}")
    if problems:
        raise UsageError(f'cannot resume from {args.resume}: ' + '; '.join(problems))


# ---------------------------------------------------------------- train / eval

def train_one_epoch(epoch, task: TrainTask, loader, scheduler, accelerator, args) -> Dict[str, float]:
    sums: Dict[str, torch.Tensor] = {}
    count = torch.zeros((), device=accelerator.device)
    num_batches = len(loader)
    bar = tqdm(loader, desc=f'epoch {epoch}', disable=not accelerator.is_main_process, leave=False, dynamic_ncols=True)
    watch = NonFiniteLossWatch(accelerator.device)
    task.set_epoch(epoch)
    for batch_idx, (x, y) in enumerate(bar):
        parts = task.step(x, y, batch_idx, num_batches)
        watch.update(batch_idx, parts)
        for k, v in parts.items():
            if k != 'grad_norm':
                sums[k] = sums.get(k, 0.) + v.float() * x.shape[0]
        count += x.shape[0]
        if scheduler is not None:
            scheduler.step_update(num_updates=task.num_updates)
        if batch_idx % args.log_interval == 0 or batch_idx == num_batches - 1:
            watch.check(epoch, num_batches, accelerator)
            lr = task.optimizer.param_groups[0]['lr']
            bar.set_postfix(loss=f"{parts['loss'].item():.4f}", lr=f'{lr:.3g}')
            _logger.info(
                f'Train: {epoch} [{batch_idx:>4d}/{num_batches} ({100. * (batch_idx + 1) / num_batches:>3.0f}%)]  '
                + '  '.join(f'{k}: {v.item():.4f}' for k, v in parts.items()) + f'  LR: {lr:.3e}')
    if not sums:
        return {}
    keys = sorted(sums)
    totals = accelerator.reduce(torch.stack([sums[k] for k in keys] + [count]), reduction='sum')
    return {k: (totals[i] / totals[-1]).item() for i, k in enumerate(keys)}


class NonFiniteLossWatch:
    """ The first step of an epoch whose loss is NaN/inf, with its loss parts. Kept on the device, so
    steps need no host sync; ``check`` (at log lines) syncs and raises TrainingDiverged, on every
    process alike. """

    def __init__(self, device):
        self.step = torch.full((1,), -1, dtype=torch.long, device=device)
        self.names: List[str] = []
        self.values: Optional[torch.Tensor] = None

    def update(self, step: int, parts: Dict[str, torch.Tensor]):
        self.names = [k for k in parts if k != 'grad_norm']
        values = torch.stack([parts[k].float().reshape(()) for k in self.names])
        first = (self.step < 0) & ~torch.isfinite(parts['loss'].float().reshape(1))
        self.step = torch.where(first, torch.full_like(self.step, step), self.step)
        self.values = values if self.values is None else torch.where(first, values, self.values)

    def check(self, epoch: int, num_batches: int, accelerator):
        steps = accelerator.gather(self.step).tolist()  # any process: all stop together
        bad = [(p, st) for p, st in enumerate(steps) if st >= 0]
        if not bad:
            return
        process, step = min(bad, key=lambda b: b[1])
        where = f'epoch {epoch}, step {step} of {num_batches}'
        if len(steps) > 1:
            where += f' on process {process}'
        parts = ''
        if self.step.item() >= 0:
            parts = ': ' + ', '.join(f'{k} {v:.4g}' for k, v in zip(self.names, self.values.tolist()))
        raise TrainingDiverged(f'loss is not finite at {where}{parts}')


def _topk_correct(logits: torch.Tensor, y: torch.Tensor):
    k = min(5, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    hit = top == y[:, None]
    return hit[:, 0].float(), hit.any(dim=-1).float()


def recompute_student_bn(model: nn.Module, loader, accelerator, dynamic_teacher: bool):
    """ --precise-bn: running statistics of the current weights (each process on its shard;
    --dist-bn then averages them across processes). """
    def forward(x):
        with accelerator.autocast():
            return model(x, mode='both') if dynamic_teacher else model(x)
    # iterating a loader draws its worker seed from the global generator: without the fork, the
    # recompute would change the augmentations of every later epoch
    cuda = [accelerator.device] if accelerator.device.type == 'cuda' else []
    with torch.random.fork_rng(devices=cuda):
        recompute_bn_stats(model, (x for x, _ in loader), forward)


@torch.no_grad()
def validate(model: nn.Module, loader, accelerator, dynamic_teacher: bool, ema_model: Optional[nn.Module] = None):
    """ Top-1/top-5 (%) of the student, the DT and the EMA student over the whole (sharded) loader. """
    model.eval()
    if ema_model is not None:
        ema_model.eval()
    per_sample: Dict[str, List[torch.Tensor]] = {}

    def add(name, value):
        per_sample.setdefault(name, []).append(accelerator.gather_for_metrics(value))

    for x, y in loader:
        with accelerator.autocast():
            if dynamic_teacher:
                zs, zd = model(x, mode='both')
            else:
                zs, zd = model(x), None
            ze = ema_model(x) if ema_model is not None else None
        add('loss', F.cross_entropy(zs.float(), y, reduction='none'))
        for prefix, logits in (('', zs), ('dt_', zd), ('ema_', ze)):
            if logits is not None:
                top1, top5 = _topk_correct(logits, y)
                add(f'{prefix}top1', top1)
                add(f'{prefix}top5', top5)
    metrics = {}
    for name, values in per_sample.items():
        mean = torch.cat(values).double().mean().item()  # float64: 838 of 1000 reads 83.8, not 83.79999
        metrics[name] = mean if name == 'loss' else 100. * mean
    if 'dt_top1' in metrics:
        metrics['gap_top1'] = metrics['dt_top1'] - metrics['top1']
    return metrics


def read_summary(path: str, start_epoch: int) -> List[dict]:
    # rows of epochs that will run again (a kill after the row, before the checkpoint) are dropped
    if start_epoch == 0:
        return []
    return [row for row in gpd_checkpoint.read_summary(path) if row['epoch'] < start_epoch]


def write_summary(path: str, rows: List[dict]):
    def write(tmp):
        with open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    gpd_checkpoint.write_atomic(path, write)


def export_student(source: nn.Module, gpd: bool, output_dir: str, data_config: dict, label_names):
    """ Write the plain timm student as student.safetensors + config.json (timm Hub layout), through
    the writer hfhub.publish uses too; non-finite weights are refused. """
    student = source.extract_student() if gpd else deepcopy(source).eval()
    try:
        gpd_checkpoint.export_student(student, output_dir, data_config, label_names, 'student.safetensors')
    except gpd_checkpoint.NonFiniteWeightsError as e:
        raise TrainingDiverged(f'{e}; nothing exported') from e


# ---------------------------------------------------------------- main

def setup_logging(is_main: bool):
    # a no-op where the caller (a test, a notebook) already configured logging
    logging.basicConfig(
        level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s', datefmt='%H:%M:%S')
    _logger.setLevel(logging.INFO if is_main else logging.WARNING)


def make_accelerator(args) -> Accelerator:
    mixed_precision = None  # None: whatever `accelerate launch` / its config chose
    if args.amp:
        on_cpu = PartialState().device.type == 'cpu'
        mixed_precision = 'bf16' if on_cpu or args.amp_dtype == 'bfloat16' else 'fp16'
    dataloader_config = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed)
    extra = {}
    if args.torchcompile:
        extra['dynamo_backend'] = args.torchcompile  # Accelerate compiles the model in prepare()
    return Accelerator(mixed_precision=mixed_precision, dataloader_config=dataloader_config,
                       gradient_accumulation_steps=args.grad_accum_steps,
                       log_with='wandb' if args.log_wandb else None, **extra)


def device_train_loader(args, data_config: dict, train_images, stop: int, accelerator: Optional[Accelerator]):
    """ --device-augment: the training images [0, stop) on the device, augmented there. """
    try:
        images, targets = images_of(train_images, data_config['input_size'][0])
    except ValueError as e:
        raise UsageError(f'--device-augment: {e}') from e
    if args.train_limit is not None:
        stop = min(stop, args.train_limit)
    device = accelerator.device if accelerator is not None else torch.device('cpu')
    erasing = None
    if args.reprob > 0:
        erasing = RandomErasing(args.reprob, mode=args.remode, max_count=args.recount, device=device)
    try:
        augment = DeviceAugment(
            data_config['input_size'][1:], data_config['mean'], data_config['std'], scale=args.scale,
            ratio=args.ratio, interpolation=data_config['interpolation'], hflip=args.hflip,
            color_jitter=args.color_jitter, random_erasing=erasing)
    except ValueError as e:
        raise UsageError(str(e)) from e
    processes = (accelerator.num_processes, accelerator.process_index) if accelerator is not None else (1, 0)
    return DeviceTrainLoader(images[:stop], targets[:stop], args.batch_size, augment, device, seed=args.seed,
                             num_processes=processes[0], process_index=processes[1])


def build_loaders(args, data_config: dict, train_ds, val_ds, accelerator: Optional[Accelerator] = None):
    # torch DataLoaders over timm transforms; Accelerate shards them across processes. With
    # --device-augment the training batches are augmented on the device and the deterministic
    # evaluation transforms run once (their tensors are kept)
    mode = 'L' if data_config['input_size'][0] == 1 else 'RGB'
    train_tf = create_transform(
        data_config['input_size'], is_training=True, no_aug=args.no_aug, scale=args.scale, ratio=args.ratio,
        hflip=args.hflip, color_jitter=args.color_jitter, auto_augment=args.aa, interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], re_prob=args.reprob, re_mode=args.remode,
        re_count=args.recount)
    eval_tf = create_transform(**data_config, is_training=False)
    train_tf.transforms.insert(0, ConvertImageMode(mode))
    eval_tf.transforms.insert(0, ConvertImageMode(mode))
    train_images = train_ds
    test_ds = None
    num_train = len(train_ds)
    if args.val_holdout:
        # the held-out tail of the training split validates; the validation split becomes the test set
        num_train = holdout_bounds(args, len(train_ds))
        test_ds = set_transform(val_ds, eval_tf, None)
        val_ds = set_transform(copy(train_ds), eval_tf, args.val_limit, start=num_train)
    else:
        val_ds = set_transform(val_ds, eval_tf, args.val_limit)
    train_ds = set_transform(train_ds, train_tf, args.train_limit, stop=num_train)
    loader_kwargs = dict(num_workers=args.workers, pin_memory=args.pin_mem)
    train_loader = None
    if args.device_augment:
        # first: only a dataset held in memory as one array is small enough to keep as tensors
        train_loader = device_train_loader(args, data_config, train_images, num_train, accelerator)
        val_ds, test_ds = cached_transform(val_ds), test_ds and cached_transform(test_ds)
        loader_kwargs = dict(num_workers=0)
        if args.no_aug:  # the training transform is deterministic too: computed once as well
            train_loader, train_ds = None, cached_transform(train_ds)
    if train_loader is None:
        train_loader = torch.utils.data.DataLoader(
            train_ds, batch_size=args.batch_size, shuffle=True, drop_last=True, **loader_kwargs)
    eval_batch = args.validation_batch_size or args.batch_size
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=eval_batch, shuffle=False, **loader_kwargs)
    test_loader = None if test_ds is None else torch.utils.data.DataLoader(
        test_ds, batch_size=eval_batch, shuffle=False, **loader_kwargs)
    bn_loader = None
    if args.precise_bn > 0:
        bn_ds = copy(train_images)  # the training images under the eval transforms (shares the image data)
        bn_limit = min(args.train_limit or num_train, num_train, args.precise_bn * args.batch_size)
        bn_ds = set_transform(bn_ds, eval_tf, bn_limit)
        bn_loader = torch.utils.data.DataLoader(
            cached_transform(bn_ds) if args.device_augment else bn_ds, batch_size=args.batch_size, shuffle=False,
            **loader_kwargs)
    return train_loader, val_loader, test_loader, bn_loader


def mixup_active(args) -> bool:
    return args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None


def build_task(args, model, optimizer, accelerator, dynamic_teacher: bool, teacher, model_ema) -> TrainTask:
    kd = None
    if teacher is not None:
        kd = kd_loss_from_name(args.kd_loss, alpha=args.kd_alpha, beta=args.kd_beta, temperature=args.kd_temperature)
    mixup_fn = None
    criterion = nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    if mixup_active(args):
        # timm's train.py: Mixup makes smoothed soft targets, the CE takes them as they are
        mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.num_classes)
        criterion = SoftTargetCrossEntropy()
    return TrainTask(
        model, optimizer, criterion,
        mixup_fn=mixup_fn,
        mixup_off_epoch=args.mixup_off_epoch,
        grad_accum_steps=args.grad_accum_steps,
        channels_last=args.channels_last,
        accelerator=accelerator,
        dynamic_teacher=dynamic_teacher,
        static_teacher=teacher,
        kd_loss=kd,
        dt_loss=DynamicTeacherKD(args.gpd_dt_weight, args.kd_temperature) if dynamic_teacher else None,
        clip_grad=args.clip_grad,
        model_ema=model_ema,
    )


def restore_training_state(args, ckpt: dict, model: nn.Module, model_ema, optimizer, scheduler, accelerator):
    """ Load a resume checkpoint into the freshly built objects; returns (start_epoch, best_metric, rng). """
    try:
        model.load_state_dict(ckpt['state_dict'], strict=True)
        if model_ema is not None:
            if ckpt.get('state_dict_ema') is None:
                raise UsageError(f'{args.resume} has no EMA weights to resume --model-ema from')
            model_ema.module.load_state_dict(ckpt['state_dict_ema'], strict=True)
    except RuntimeError as e:
        raise UsageError(f'{args.resume} does not fit the model built from the arguments: '
                         f'{str(e).splitlines()[0]}') from e
    if not args.no_resume_opt:
        optimizer.load_state_dict(ckpt['optimizer'])
        if accelerator.scaler is not None and ckpt.get('scaler') is not None:
            accelerator.scaler.load_state_dict(ckpt['scaler'])
    if scheduler is not None:
        # timm schedulers hold their configuration in their state: a longer --epochs must win
        if all(ckpt['args'].get(k) == getattr(args, k) for k in SCHEDULE_ARGS):
            scheduler.load_state_dict(ckpt['scheduler'])
        else:
            _logger.info('Schedule arguments changed since the checkpoint: the schedule follows the new arguments')
    return ckpt['epoch'] + 1, ckpt['metric'], ckpt['rng']


def renormalized_teacher(args, teacher: nn.Module, data_config: dict) -> nn.Module:
    """ The static teacher reading the student's batches: pretrained weights expect their own
    mean/std (their pretrained_cfg; the input is renormalized, as timm's DistillationTeacher does);
    a --teacher-checkpoint is taken to be trained on this data, normalized as the student is. """
    mean, std = data_config['mean'], data_config['std']
    if args.teacher_checkpoint:
        wrapped = RenormalizedTeacher(teacher, mean, std, teacher_mean=mean, teacher_std=std)
    else:
        wrapped = RenormalizedTeacher(teacher, mean, std)
    if wrapped.renormalizes:
        _logger.info(f'Static teacher input renormalized from mean {tuple(mean)} / std {tuple(std)} to its own '
                     f'{tuple(wrapped.teacher.mean_kd.flatten().tolist())} / '
                     f'{tuple(wrapped.teacher.std_kd.flatten().tolist())}')
    return wrapped


def prepare_model_layout(args, model: nn.Module, accelerator) -> nn.Module:
    """ --grad-checkpointing, --sync-bn, --channels-last (before the optimizer sees the parameters). """
    if accelerator.distributed_type == DistributedType.FSDP and args.gpd:
        # FSDP gathers a module's parameters only around that module's own forward; the student
        # reads the DT's parameters outside of it (its weights are views of them), and FSDP gives
        # no CPU processes to test a whole-model unit with: refused rather than untested
        raise UsageError('FSDP is not supported for GPD training (the student\'s weights are views of the '
                         'dynamic teacher\'s, read outside the DT\'s forward); use DDP: accelerate launch '
                         '--multi_gpu (see README, Scale-out)')
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.sync_bn:
        if accelerator.num_processes == 1:
            _logger.info('--sync-bn: one process, nothing to synchronize')
        elif accelerator.device.type == 'cpu':
            raise UsageError('--sync-bn needs GPU processes: torch\'s SyncBatchNorm does not run on CPU')
        else:
            model = convert_sync_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """ timm's SyncBatchNorm conversion; for a GPDModel, of the DT and of the student, whose norm
    layers hold no parameters of their own (they are views of the DT's): placeholders let timm's
    converter run, then leave again. """
    from timm.layers import convert_sync_batchnorm as timm_convert
    if not getattr(model, 'has_teacher', False):
        return timm_convert(model)
    model.teacher = timm_convert(model.teacher)
    shared = set(model._shared)
    placeholders = []
    for path, module in model.student.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            for attr in ('weight', 'bias'):
                if f'{path}.{attr}' in shared and attr not in module._parameters:
                    module._parameters[attr] = nn.Parameter(torch.empty(module.num_features))
                    placeholders.append(f'{path}.{attr}')
    model.student = timm_convert(model.student)
    for name in placeholders:
        path, _, attr = name.rpartition('.')
        del model.student.get_submodule(path)._parameters[attr]
    return model


def keep_checkpoint_history(output_dir: str, epoch: int, rows: List[dict], metric_key: str, keep: int):
    """ --checkpoint-hist: last.pth of this epoch also as checkpoint-EPOCH.pth; only the `keep` best
    epochs (by the eval metric, ties: the later) keep theirs. """
    path = os.path.join(output_dir, f'checkpoint-{epoch}.pth')
    gpd_checkpoint.copy_atomic(os.path.join(output_dir, 'last.pth'), path)
    sign = 1. if 'loss' in metric_key else -1.  # lower loss / higher accuracy first
    ranked = sorted(((sign * float(r[f'eval_{metric_key}']), -int(r['epoch'])) for r in rows
                     if os.path.exists(os.path.join(output_dir, f'checkpoint-{int(r["epoch"])}.pth'))))
    for _, neg_epoch in ranked[keep:]:
        os.remove(os.path.join(output_dir, f'checkpoint-{-neg_epoch}.pth'))


def make_output_dir(args) -> str:
    if args.resume and not args.experiment:
        return os.path.dirname(os.path.abspath(args.resume))  # continue in the checkpoint's own folder
    exp_name = args.experiment or '-'.join(
        [datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), 'gpd' if args.gpd else 'base'])
    return get_outdir(args.output or './output', exp_name, inc=not args.resume)


def checkpoint_state(args, epoch: int, model, optimizer, scheduler, model_ema, accelerator, rng, metric,
                     data_config: dict, label_names: Optional[List[str]] = None) -> dict:
    """ The training checkpoint of docs/CONTRACTS.md. """
    _, h, w = data_config['input_size']
    state = {
        'format': CHECKPOINT_FORMAT,
        'version': CHECKPOINT_VERSION,
        'epoch': epoch,
        'arch': student_arch(args),  # the stock student's timm name, also for a gpd_* --model
        'args': vars(args),
        'state_dict': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'scheduler': scheduler.state_dict() if scheduler is not None else None,
        'rng': rng,
        'metric': metric,
        'num_classes': args.num_classes,
        'in_chans': data_config['input_size'][0],
        'img_size': h if h == w else [h, w],
        # what the exported student's config.json records, so hfhub.publish writes the same one
        'data_config': dict(data_config),
        'label_names': list(label_names) if label_names else None,
        'env': run_environment(accelerator.device, accelerator.num_processes, accelerator.mixed_precision),
    }
    if model_ema is not None:
        state['state_dict_ema'] = model_ema.module.state_dict()
    if accelerator.scaler is not None:
        state['scaler'] = accelerator.scaler.state_dict()
    if args.gpd:
        state['gpd'] = gpd_kwargs(args)
    return state


def ckpt_path_exists(output_dir: Optional[str]) -> bool:
    return output_dir is not None and os.path.isfile(os.path.join(output_dir, 'last.pth'))


@contextmanager
def divergence_report(output_dir: Optional[str], saved: dict):
    """ Adds to a TrainingDiverged error what is left on disk: the last good checkpoint, no export. """
    try:
        yield
    except TrainingDiverged as e:
        if output_dir is None:  # not the main process
            raise
        if saved.get('epoch') is not None:
            kept = f'last good checkpoint: {os.path.join(output_dir, "last.pth")} (epoch {saved["epoch"]})'
        else:
            kept = 'no checkpoint was written'
        raise TrainingDiverged(f'{e}; {kept}; no student exported') from e


def main(argv=None):
    """ Train; returns the trained (unwrapped) model, handy for scripts and tests. """
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    setup_logging(accelerator.is_main_process)
    is_main = accelerator.is_main_process
    set_seed(args.seed)

    check_warmup(args)
    ckpt = read_training_checkpoint(args.resume) if args.resume else None
    # the model is built before the dataset is opened (a folder scan can take minutes), so that a
    # bad --gpd-ratio or a model GPD cannot widen fails at once
    built = None
    if args.num_classes is not None:
        if ckpt is not None:
            check_resume_compatible(args, ckpt, args.num_classes)
        built = build_model(args, args.num_classes, resuming=ckpt is not None)
    elif args.gpd:
        with torch.random.fork_rng(devices=[]):  # a trial build: the real one must draw the same weights
            build_model(args, TRIAL_NUM_CLASSES, resuming=True)
    train_ds, val_ds = build_datasets(args)
    label_names = class_names(train_ds)
    if built is None:
        args.num_classes = len(label_names) if label_names else None
        if args.num_classes is None:
            raise UsageError('cannot tell the number of classes from the dataset: pass --num-classes')
        if ckpt is not None:
            check_resume_compatible(args, ckpt, args.num_classes)
        built = build_model(args, args.num_classes, resuming=ckpt is not None)
    model, data_config = built
    del built
    dynamic_teacher = args.gpd and model.has_teacher
    if args.eval_metric.startswith(('dt_', 'gap_')) and not dynamic_teacher:
        raise UsageError(f'--eval-metric {args.eval_metric} needs a dynamic teacher (--gpd without --gpd-cbr-only)')
    train_loader, val_loader, test_loader, bn_loader = build_loaders(args, data_config, train_ds, val_ds, accelerator)
    num_train, num_val = len(train_loader.dataset), len(val_loader.dataset)
    num_test = len(test_loader.dataset) if test_loader is not None else 0
    teacher = None
    if args.teacher:
        teacher = renormalized_teacher(
            args, create_static_teacher(args, args.num_classes, data_config['input_size'][0]), data_config
        ).to(accelerator.device)

    global_batch = args.batch_size * accelerator.num_processes * args.grad_accum_steps
    if args.lr is None:
        args.lr = args.lr_base * global_batch / args.lr_base_size
        _logger.info(f'Learning rate {args.lr:.4g} from --lr-base {args.lr_base} at global batch {global_batch}')
    model = prepare_model_layout(args, model, accelerator)
    # --layer-decay / --weight-decay groups from the model's group_matcher() / no_weight_decay()
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if bn_loader is not None:
        bn_loader = accelerator.prepare(bn_loader)
    if test_loader is not None:
        test_loader = accelerator.prepare(test_loader)
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    if len(train_loader) == 0:
        raise UsageError(f'no full training batch: {num_train} images for batch size {args.batch_size} '
                         f'x {accelerator.num_processes} processes')
    updates_per_epoch = (len(train_loader) + args.grad_accum_steps - 1) // args.grad_accum_steps
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(unwrapped, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)

    start_epoch, best_metric, rng_states = 0, None, None
    if ckpt is not None:
        start_epoch, best_metric, rng_states = restore_training_state(
            args, ckpt, unwrapped, model_ema, optimizer, scheduler, accelerator)
        del ckpt
        _logger.info(f'Resumed from {args.resume}: continuing at epoch {start_epoch}')
        if scheduler is not None:
            if args.sched_on_updates:
                scheduler.step_update(start_epoch * updates_per_epoch)
            else:
                scheduler.step(start_epoch)
    task = build_task(args, model, optimizer, accelerator, dynamic_teacher, teacher, model_ema)
    task.num_updates = start_epoch * updates_per_epoch

    output_dir, rows = None, []
    if is_main:
        output_dir = make_output_dir(args)
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            yaml.safe_dump(vars(args), f, default_flow_style=False)
        rows = read_summary(os.path.join(output_dir, 'summary.csv'), start_epoch)
        _logger.info(f'Output: {output_dir}')
        _logger.info(f'{args.model}: {"GPD" if args.gpd else "plain"} training, '
                     f'{"dynamic teacher, " if dynamic_teacher else ""}'
                     f'{"static teacher " + args.teacher + ", " if teacher is not None else ""}'
                     f'{accelerator.num_processes} process(es) on {accelerator.device.type}, '
                     f'{num_train} train / {num_val} val' + (f' / {num_test} test' if num_test else '') +
                     f' images, {num_epochs} epochs')
    if args.log_wandb:
        accelerator.init_trackers(args.experiment or os.path.basename(output_dir or 'timm-gpd'), config=vars(args))

    # after every model / loader construction, so the random streams match an uninterrupted run
    if rng_states is not None and len(rng_states) == accelerator.num_processes:
        set_rng_state(rng_states[accelerator.process_index])
    else:
        if rng_states is not None:
            _logger.warning('Process count changed since the checkpoint: random streams are reseeded')
        set_seed(args.seed + 1000 * start_epoch + accelerator.process_index)  # distinct augmentation per process

    ema_module = model_ema.module if model_ema is not None else None
    metric_key = f'ema_{args.eval_metric}' if model_ema is not None and args.eval_metric in ('top1', 'top5') \
        else args.eval_metric
    saved = {'epoch': start_epoch - 1 if ckpt_path_exists(output_dir) else None}
    with logging_redirect_tqdm(), divergence_report(output_dir, saved):
        for epoch in range(start_epoch, num_epochs):
            t0 = time.time()
            train_loader.set_epoch(epoch)
            train_metrics = train_one_epoch(epoch, task, train_loader, scheduler, accelerator, args)
            lr = optimizer.param_groups[0]['lr']
            if bn_loader is not None:
                recompute_student_bn(unwrapped, bn_loader, accelerator, dynamic_teacher)
            if accelerator.num_processes > 1 and args.dist_bn:
                # each process updated its BN statistics on its own batches
                for m in filter(None, (unwrapped, ema_module)):
                    distribute_bn(m, accelerator.num_processes, reduce=args.dist_bn == 'reduce')
            eval_metrics = validate(unwrapped, val_loader, accelerator, dynamic_teacher, ema_module)
            metric = eval_metrics[metric_key]
            if scheduler is not None:
                scheduler.step(epoch + 1, metric)
            _logger.info(f'Epoch {epoch}: ' + '  '.join(f'{k} {v:.4f}' for k, v in eval_metrics.items()))
            test_metrics = {}
            if test_loader is not None:  # recorded only: no choice below reads it
                test_metrics = validate(unwrapped, test_loader, accelerator, dynamic_teacher, ema_module)
                _logger.info(f'Epoch {epoch} test: ' + '  '.join(f'{k} {v:.4f}' for k, v in test_metrics.items()))

            for name, module in (('model', unwrapped), ('EMA model', ema_module)):
                bad = non_finite_tensors(module) if module is not None else []
                if bad:
                    raise TrainingDiverged(f'the {name} has non-finite weights after epoch {epoch} '
                                           f'({len(bad)} tensors, first: {bad[0]})')
            rng_states = gather_object([get_rng_state()])
            if is_main:
                row = {'epoch': epoch, 'lr': lr, 'epoch_time': round(time.time() - t0, 3)}
                row.update({f'train_{k}': v for k, v in train_metrics.items()})
                row.update({f'eval_{k}': v for k, v in eval_metrics.items()})
                row.update({f'test_{k}': v for k, v in test_metrics.items()})
                rows.append(row)
                write_summary(os.path.join(output_dir, 'summary.csv'), rows)
                if args.log_wandb:
                    accelerator.log({k: v for k, v in row.items() if k != 'epoch'}, step=epoch)

                lower_is_better = 'loss' in metric_key
                is_best = best_metric is None or (metric < best_metric if lower_is_better else metric > best_metric)
                best_metric = metric if is_best else best_metric
                state = checkpoint_state(args, epoch, unwrapped, optimizer, scheduler, model_ema, accelerator,
                                         rng_states, best_metric, data_config, label_names)
                last_path = os.path.join(output_dir, 'last.pth')
                save_atomic(state, last_path)
                if is_best:
                    gpd_checkpoint.copy_atomic(last_path, os.path.join(output_dir, 'model_best.pth'))
                if args.checkpoint_hist:
                    keep_checkpoint_history(output_dir, epoch, rows, metric_key, args.checkpoint_hist)
                saved['epoch'] = epoch
            accelerator.wait_for_everyone()

    if is_main:
        export_student(ema_module or unwrapped, args.gpd, output_dir, data_config, label_names)
        _logger.info(f'Done. Best {metric_key}: {best_metric}. Student written to {output_dir}/student.safetensors')
    if args.log_wandb:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return unwrapped


if __name__ == '__main__':
    exit_on_sigterm()  # a kill runs the cleanup of half-written files instead of leaving *.tmp behind
    try:
        main()
    except UsageError as e:
        print(f'train.py: error: {e}', file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f'train.py: error: training diverged: {e}', file=sys.stderr)
        sys.exit(3)
