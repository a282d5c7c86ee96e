"""Is a student's low top-1 its weights, or its BatchNorm running statistics?

A GPD student can train as well as its DT in train mode (same training loss) and still score far
below it in eval mode, where BatchNorm normalizes with running statistics instead of the batch's.
This evaluates a train.py checkpoint's student (and DT) on the run's own validation images, built
by train.py's own data pipeline, under four sets of BatchNorm statistics:

  stored           the checkpoint's running statistics (what its last validation used)
  precise (eval)   recomputed as train.py --precise-bn does: the first BATCHES x batch-size training
                   images under the eval transforms (only when the run used --precise-bn)
  precise (train)  recomputed over BATCHES shuffled training batches under the training transforms
  batch stats      each validation batch normalized with its own statistics (train-mode BatchNorm)

If the student is behind its DT under the running statistics but level with it under batch
statistics, the gap is in the statistics, not in the weights.

    python benchmarks/bn_check.py --checkpoint RUN/final.pth --data-dir data
    python benchmarks/bn_check.py --checkpoint RUN/last.pth --data-dir data --limit 1000 --batches 8
"""
import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's timm_gpd and train.py, not an installed one
import train  # noqa: E402  (the run's own data pipeline)
from timm_gpd.checkpoint import CheckpointError, build_model, is_gpd_model, load_checkpoint  # noqa: E402
from timm_gpd.precise_bn import recompute_bn_stats, running_stat_norms  # noqa: E402


def run_args(checkpoint: dict, data_dir: Optional[str], limit: Optional[int], batch_size: Optional[int]):
    """ train.py's arguments of the run (its defaults under what it recorded), for its loaders. """
    args = train.build_parser().parse_args([])
    for key, value in checkpoint['args'].items():
        setattr(args, key, value)
    if data_dir is not None:
        args.data_dir = data_dir
    if limit is not None:
        args.val_limit = limit
    args.workers = 0
    args.pin_mem = False
    if batch_size is not None:
        args.validation_batch_size = batch_size
    return args


@torch.no_grad()
def top1(model: nn.Module, loader: Iterable, gpd: bool, device: torch.device) -> Dict[str, float]:
    hits: Dict[str, float] = {}
    seen = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        outputs = model(x, mode='both') if gpd else (model(x),)
        for name, logits in zip(('student', 'dt'), outputs):
            hits[name] = hits.get(name, 0.0) + (logits.argmax(-1) == y).sum().item()
        seen += len(y)
    return {name: 100.0 * h / max(seen, 1) for name, h in hits.items()}


def with_batch_statistics(model: nn.Module) -> nn.Module:
    """ A copy whose BatchNorm layers normalize with each batch's own statistics (dropout stays off). """
    copied = copy.deepcopy(model).eval()
    for m in running_stat_norms(copied):
        m.train()
    return copied


def recomputed(model: nn.Module, batches: Iterable[torch.Tensor], gpd: bool) -> nn.Module:
    """ A copy whose running statistics are recomputed over ``batches`` (train.py's --precise-bn). """
    copied = copy.deepcopy(model)
    recompute_bn_stats(copied, batches, (lambda x: copied(x, mode='both')) if gpd else copied)
    return copied.eval()


def first(loader: Iterable, n: int, device: torch.device) -> Iterable[torch.Tensor]:
    for i, (x, _) in enumerate(loader):
        if i >= n:
            return
        yield x.to(device)


def check(checkpoint_path: str, data_dir: Optional[str], batches: int, limit: Optional[int],
          batch_size: Optional[int], seed: int, device: str = 'cpu') -> Dict[str, Dict[str, float]]:
    device = torch.device(device)
    checkpoint = load_checkpoint(checkpoint_path)
    model = build_model(checkpoint).eval().to(device)
    gpd = is_gpd_model(model)
    args = run_args(checkpoint, data_dir, limit, batch_size)
    data_config = checkpoint.get('data_config') or train.resolve_data(args, model)
    torch.manual_seed(seed)
    train_ds, val_ds = train.build_datasets(args)
    train_loader, val_loader, _, bn_loader = train.build_loaders(args, data_config, train_ds, val_ds)
    rows = {'stored': top1(model, val_loader, gpd, device)}
    if bn_loader is not None:
        precise = recomputed(model, first(bn_loader, args.precise_bn, device), gpd)
        rows['precise (eval)'] = top1(precise, val_loader, gpd, device)
    precise = recomputed(model, first(train_loader, batches, device), gpd)
    rows['precise (train)'] = top1(precise, val_loader, gpd, device)
    rows['batch stats'] = top1(with_batch_statistics(model), val_loader, gpd, device)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True, help='train.py checkpoint (last.pth, final.pth)')
    p.add_argument('--data-dir', help="dataset root (default: the run's)")
    p.add_argument('--batches', type=int, default=8, help='training batches for "precise (train)"')
    p.add_argument('--limit', type=int, help='evaluate only the first N validation images')
    p.add_argument('--batch-size', type=int, help="validation batch size (default: the run's); also the batch "
                                                   'whose statistics "batch stats" uses')
    p.add_argument('--seed', type=int, default=0, help='draws the "precise (train)" batches')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--results-file', help='write the table as JSON')
    args = p.parse_args(argv)
    if args.batches < 1:
        p.error(f'--batches must be at least 1, got {args.batches}')
    try:
        rows = check(args.checkpoint, args.data_dir, args.batches, args.limit, args.batch_size, args.seed,
                     args.device)
    except (CheckpointError, train.UsageError) as e:
        print(f'{p.prog}: error: {e}', file=sys.stderr)
        return 2
    print(f'{args.checkpoint}: validation top-1 (%) under each set of BatchNorm statistics')
    print(f'{"statistics":<16} {"student":>8} {"DT":>8}')
    for name, row in rows.items():
        dt = f'{row["dt"]:8.2f}' if 'dt' in row else f'{"-":>8}'
        print(f'{name:<16} {row["student"]:8.2f} {dt}')
    if args.results_file:
        Path(args.results_file).write_text(json.dumps(dict(checkpoint=args.checkpoint, top1=rows), indent=1) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
