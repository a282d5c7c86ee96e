#!/usr/bin/env python3
""" timm-gpd validation script

Top-1/top-5/loss and throughput of one of:
  * a stock or Hub timm model:        --model resnet18 [--pretrained] | --model hf-hub:ORG/NAME --pretrained
  * an extracted student:             --checkpoint output/EXP (folder) | output/EXP/student.safetensors
  * a gpd_* model (its student, or its dynamic teacher with --gpd-teacher):
                                      --model gpd_resnet18 [--pretrained] [--gpd-teacher]
  * a train.py checkpoint:            --checkpoint output/EXP/last.pth [--use-ema] [--gpd-teacher]

Example:
    python validate.py --data-dir data --dataset torch/fashion_mnist --in-chans 1 --img-size 32 \\
        --checkpoint output/EXP/last.pth --results-file results.csv
"""
import argparse
import csv
import json
import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
import timm
from timm.data import create_dataset, create_transform
from timm.models import parse_model_name, resolve_model_input_args

from hfhub.cache import explain_model_errors
from hfhub.export import data_config_from_args
from timm_gpd.checkpoint import (
    CheckpointError, build_model, check_checkpoint, is_gpd_model, load_weights, read_weights, state_dict_of)

_logger = logging.getLogger('validate')

STUDENT_WEIGHT_FILES = ('model.safetensors', 'student.safetensors')


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='timm-gpd validation', formatter_class=argparse.RawTextHelpFormatter)
    group = parser.add_argument_group('Dataset')
    group.add_argument('--data-dir', metavar='DIR', default=None, help='dataset root')
    group.add_argument('--dataset', metavar='NAME', default='', help='timm dataset name, e.g. torch/fashion_mnist')
    group.add_argument('--split', metavar='NAME', default='validation', help='dataset split (default: validation)')
    group.add_argument('--limit', type=int, default=None, metavar='N', help='evaluate only the first N images')
    group.add_argument('-j', '--workers', type=int, default=2, metavar='N', help='data loading workers')

    group = parser.add_argument_group('Model')
    group.add_argument('--model', metavar='NAME', default=None,
                       help='timm name, gpd_* name, hf-hub:ORG/NAME or local-dir:PATH')
    group.add_argument('--pretrained', action='store_true', help='load the model\'s pretrained weights')
    group.add_argument('--checkpoint', metavar='PATH', default=None,
                       help='train.py checkpoint, student folder, or .safetensors student')
    group.add_argument('--use-ema', action='store_true', help='evaluate the checkpoint\'s EMA weights')
    group.add_argument('--gpd-teacher', action='store_true', help='evaluate a GPD model\'s dynamic teacher')
    group.add_argument('--num-classes', type=int, default=None, metavar='N', help='classifier classes')
    group.add_argument('--in-chans', type=int, default=None, metavar='N', help='image channels (1: grayscale)')
    group.add_argument('--img-size', type=int, default=None, metavar='N', help='input image size')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='override mean')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='override std')
    group.add_argument('--crop-pct', type=float, default=None, metavar='PCT', help='override crop pct')
    group.add_argument('--interpolation', default=None, metavar='NAME', help='override resize interpolation')

    group = parser.add_argument_group('Run')
    group.add_argument('-b', '--batch-size', type=int, default=256, metavar='N', help='batch size')
    group.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    group.add_argument('--seed', type=int, default=42, help='seeds the initialization of untrained models')
    group.add_argument('--amp', action='store_true', help='mixed precision autocast')
    group.add_argument('--amp-dtype', default=None, choices=('float16', 'bfloat16'),
                       help='autocast dtype (default: float16 on cuda, bfloat16 on cpu)')
    group.add_argument('--results-file', default=None, metavar='PATH', help='write results (.json or .csv)')
    group.add_argument('--results-format', default=None, choices=('csv', 'json'),
                       help='default: from the results file extension, csv otherwise')
    return parser


def _maybe_import_gpd(model_name: Optional[str]) -> None:
    # registers the gpd_* entrypoints; a stock model or extracted student never needs timm_gpd
    if model_name and parse_model_name(model_name)[1].startswith('gpd_'):
        import timm_gpd  # noqa: F401


def _model_kwargs(args) -> Dict[str, Any]:
    return {k: v for k, v in dict(num_classes=args.num_classes, in_chans=args.in_chans).items() if v is not None}


def _create_named_model(args, pretrained: bool) -> torch.nn.Module:
    _maybe_import_gpd(args.model)
    kwargs = _model_kwargs(args)
    with explain_model_errors(args.model):
        if args.img_size is not None:
            # only architectures that are built for a size (ViT) take img_size as a constructor argument
            resolved = resolve_model_input_args(args.model, args={'img_size': args.img_size}, **kwargs)
            if 'img_size' in resolved:
                kwargs['img_size'] = resolved['img_size']
        return timm.create_model(args.model, pretrained=pretrained, **kwargs)


def _student_folder_model(folder: Path, weights: Path, args) -> torch.nn.Module:
    if not (folder / 'config.json').is_file():
        raise FileNotFoundError(
            f'{folder} has no config.json to rebuild the student from; pass --model ARCH with the weights file.')
    if args.model:
        raise ValueError(f'--model conflicts with {weights}: its architecture comes from {folder / "config.json"}.')
    model = timm.create_model(f'local-dir:{folder}', pretrained=False)
    _check_matches(model, args, str(folder / 'config.json'))
    return model


def _check_matches(model: torch.nn.Module, args, source: str) -> None:
    for key in ('num_classes', 'in_chans'):
        want, have = getattr(args, key), getattr(model, key, None)
        if want is not None and have is not None and want != have:
            raise ValueError(f'--{key.replace("_", "-")} {want} does not match {source} ({key}={have}).')


def _load_student_weights(path: Path, args) -> torch.nn.Module:
    if path.is_dir():
        found = [path / n for n in STUDENT_WEIGHT_FILES if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f'{path} has none of {", ".join(STUDENT_WEIGHT_FILES)}.')
        folder, weights = path, found[0]
    else:
        folder, weights = path.parent, path
    model = _create_named_model(args, pretrained=False) if args.model else _student_folder_model(folder, weights, args)
    load_weights(model, read_weights(weights, 'student weights'), str(weights))
    return model


def _load_train_checkpoint(path: Path, checkpoint: Dict[str, Any], args) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    arch = checkpoint['arch']
    trained = f'gpd_{arch}' if checkpoint.get('gpd') is not None else arch
    if args.model and args.model not in (arch, trained):
        raise ValueError(f'--model {args.model} does not match {path} (trained {trained}); drop --model.')
    for key in ('num_classes', 'in_chans', 'img_size'):
        want = getattr(args, key)
        if want is not None and checkpoint.get(key) is not None and want != checkpoint[key]:
            raise ValueError(f'--{key.replace("_", "-")} {want} does not match {path} ({key}={checkpoint[key]}).')
    model = build_model(checkpoint, use_ema=args.use_ema, source=str(path))
    # the run's own preprocessing, so top-1 matches what train.py logged
    data_args = dict(checkpoint.get('args') or {}, img_size=checkpoint.get('img_size'))
    return model, data_args


def load_eval_model(args) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The model to evaluate (eval mode) and the base arguments for its preprocessing."""
    if args.checkpoint is None:
        if not args.model:
            raise ValueError('Give --model NAME and/or --checkpoint PATH.')
        return _create_named_model(args, args.pretrained).eval(), {}
    path = Path(args.checkpoint)
    if not path.exists():
        raise FileNotFoundError(f'Checkpoint not found: {path}')
    if path.is_dir() or path.suffix == '.safetensors':
        return _load_student_weights(path, args).eval(), {}
    content = read_weights(path)
    try:
        checkpoint = check_checkpoint(content, path, hint='for a plain state dict, pass --model ARCH too')
    except CheckpointError:
        if not args.model:
            raise
        # a plain state dict / timm checkpoint for --model
        model = _create_named_model(args, pretrained=False)
        load_weights(model, state_dict_of(content, use_ema=args.use_ema), str(path))
        return model.eval(), {}
    return _load_train_checkpoint(path, checkpoint, args)


def _input_model(model: torch.nn.Module) -> torch.nn.Module:
    # the input traits (in_chans, size) live on the stock student, not on the GPD wrapper
    return model.student if is_gpd_model(model) else model


class _ConvertThen:
    """PIL mode conversion before `transform`: torchvision datasets ignore timm's input_img_mode."""

    def __init__(self, mode: str, transform):
        self.mode = mode
        self.transform = transform

    def __call__(self, img):
        if getattr(img, 'mode', self.mode) != self.mode:
            img = img.convert(self.mode)
        return self.transform(img)


def create_eval_loader(args, data_config: Dict[str, Any]) -> torch.utils.data.DataLoader:
    mode = 'L' if data_config['input_size'][0] == 1 else 'RGB'
    dataset = create_dataset(args.dataset, root=args.data_dir, split=args.split, input_img_mode=mode)
    dataset.transform = _ConvertThen(mode, create_transform(**data_config, is_training=False))
    if args.limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)


def _dataset_classes(loader) -> Optional[int]:
    dataset = getattr(loader.dataset, 'dataset', loader.dataset)
    classes = getattr(dataset, 'classes', None)
    return len(classes) if classes else None


def evaluate(model: torch.nn.Module, loader, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             forward_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """Top-1/top-5 (percent), mean cross-entropy, and images/s of the forward passes alone."""
    forward_kwargs = forward_kwargs or {}
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    n = correct1 = correct5 = 0
    loss_sum = compute_s = 0.
    with torch.inference_mode():
        for images, target in loader:
            images, target = images.to(device), target.to(device)
            start = time.perf_counter()
            with autocast:
                logits = model(images, **forward_kwargs)
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            compute_s += time.perf_counter() - start
            logits = logits.float()
            if int(target.max()) >= logits.shape[1]:
                raise ValueError(
                    f'Dataset label {int(target.max())} is out of range for a {logits.shape[1]}-class model.')
            loss_sum += F.cross_entropy(logits, target, reduction='sum').item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top.eq(target[:, None])
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(dim=1).sum().item()
            n += target.numel()
    if n == 0:
        raise ValueError('The dataset is empty: nothing to evaluate.')
    return dict(top1=100. * correct1 / n, top5=100. * correct5 / n, loss=loss_sum / n, num_images=n,
                img_per_sec=n / compute_s if compute_s > 0 else float('inf'))


def write_results(results: Dict[str, Any], path: str, fmt: Optional[str] = None) -> None:
    fmt = fmt or ('json' if path.endswith('.json') else 'csv')
    with open(path, 'w', newline='') as f:
        if fmt == 'json':
            json.dump(results, f, indent=2)
        else:
            writer = csv.DictWriter(f, fieldnames=list(results))
            writer.writeheader()
            writer.writerow(results)


def validate(args) -> Dict[str, Any]:
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    torch.manual_seed(args.seed)
    model, data_args = load_eval_model(args)
    gpd = is_gpd_model(model)
    forward_kwargs = {}
    if args.gpd_teacher:
        if not gpd or not model.has_teacher:
            raise ValueError('--gpd-teacher needs a GPD model with a dynamic teacher (a gpd_* model or --gpd checkpoint).')
        forward_kwargs['mode'] = 'teacher'
    cli_data = dict(img_size=args.img_size, mean=args.mean, std=args.std, crop_pct=args.crop_pct,
                    interpolation=args.interpolation)
    data_args.update({k: v for k, v in cli_data.items() if v is not None})
    data_config = data_config_from_args(_input_model(model), data_args)
    loader = create_eval_loader(args, data_config)
    classes = _dataset_classes(loader)
    if classes is not None and classes > model.num_classes:
        raise ValueError(f'Dataset has {classes} classes but the model has {model.num_classes}; set --num-classes.')

    amp_dtype = None
    if args.amp:
        amp_dtype = getattr(torch, args.amp_dtype or ('float16' if device.type == 'cuda' else 'bfloat16'))
    metrics = evaluate(model.to(device), loader, device, amp_dtype, forward_kwargs)
    results = dict(
        model=args.model or '',
        checkpoint=args.checkpoint or '',
        evaluated='dynamic_teacher' if args.gpd_teacher else ('gpd_student' if gpd else 'model'),
        weights='ema' if args.use_ema else ('pretrained' if args.pretrained else 'checkpoint' if args.checkpoint else 'init'),
        dataset=args.dataset,
        split=args.split,
        input_size='x'.join(str(s) for s in data_config['input_size']),
        batch_size=args.batch_size,
        device=str(device),
        amp=str(amp_dtype).replace('torch.', '') if amp_dtype else '',
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
    )
    return results


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
    args = _parser().parse_args(argv)
    try:
        results = validate(args)
    except (FileNotFoundError, ValueError) as e:
        # CheckpointError and HubModelNotFound are among these: user errors, not tracebacks
        _logger.error('%s', e)
        return 2
    print(f'--result\n{json.dumps(results, indent=2)}')
    if args.results_file:
        write_results(results, args.results_file, args.results_format)
    return 0


if __name__ == '__main__':
    sys.exit(main())
