"""Has the dynamic teacher (DT) used its width? Measure how far a trained DT has moved from being
its student replicated.

Inverse reparameterization builds the DT so that each of its widened feature maps is r copies of
the student's (copy-major: channels i*C .. i*C+C-1 are replica i), and the symmetry-breaking noise
keeps them equal at initialization. Only what training does to the replicas can make the DT a
wider function than its student; while they stay equal the DT computes what a student with the
primary block's weights would, and cannot lead it by more than that block's difference from the
student's view. For each BatchNorm output of the DT (eval mode, on the run's own held-out images,
train.py's loaders) this prints:

  replica spread   sqrt(sum_i ||a_i - mean||^2 / sum_i ||a_i||^2) over the r replicas a_i:
                   0 when the replicas are equal (the DT at initialization), 1 - 1/r when one
                   replica carries everything and the others are zero
  DT vs student    ||mean_i a_i - s|| / ||s||, s the student's feature map at the same layer:
                   how far the DT's average replica has moved from the student's features

and, over the same images, the top-1 of both and the share of images where their top-1 predictions
agree. Needs an integer width ratio (each channel copied the same number of times).

    python benchmarks/replica_spread.py --checkpoint RUN/final.pth --data-dir data
    python benchmarks/replica_spread.py --checkpoint RUN/last.pth --data-dir data --split test --limit 2000
    python benchmarks/replica_spread.py --checkpoint RUN1/final.pth RUN2/final.pth --data-dir data
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's timm_gpd and train.py, not an installed one
sys.path.insert(0, str(REPO / 'benchmarks'))  # bn_check, beside this script
import train  # noqa: E402  (the run's own data pipeline)
from bn_check import run_args  # noqa: E402
from gap_probe import load_gpd_run  # noqa: E402
from timm_gpd.checkpoint import CheckpointError  # noqa: E402


class _Sums:
    """ Running sums of the two measures' numerators and denominators for one layer. """

    def __init__(self):
        self.spread_num = self.spread_den = self.shift_num = self.shift_den = 0.0

    def add(self, dt: torch.Tensor, student: torch.Tensor, ratio: int):
        replicas = dt.unflatten(1, (ratio, dt.shape[1] // ratio)).double()  # [N, r, C, ...]
        mean = replicas.mean(1)
        self.spread_num += (replicas - mean.unsqueeze(1)).pow(2).sum().item()
        self.spread_den += replicas.pow(2).sum().item()
        self.shift_num += (mean - student.double()).pow(2).sum().item()
        self.shift_den += student.double().pow(2).sum().item()

    def row(self) -> Dict[str, float]:
        return dict(replica_spread=(self.spread_num / max(self.spread_den, 1e-30)) ** 0.5,
                    dt_vs_student=(self.shift_num / max(self.shift_den, 1e-30)) ** 0.5)


def integer_ratio(model) -> int:
    ratio = model.ratio
    if ratio is None or float(ratio) != int(ratio):
        raise CheckpointError(f'replica spread needs an integer width ratio (every channel copied equally); '
                              f'this DT has ratio {ratio}')
    return int(ratio)


def norm_layers(network: nn.Module) -> Dict[str, nn.Module]:
    return {name: m for name, m in network.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@torch.no_grad()
def measure(model, loader, ratio: int, device: torch.device) -> dict:
    """ Per BatchNorm layer: the DT's replica spread and its average replica's distance from the
    student's features; overall: both top-1s and their agreement. """
    dt_layers, student_layers = norm_layers(model.teacher), norm_layers(model.student)
    names = [n for n in dt_layers if n in student_layers
             and getattr(dt_layers[n], 'num_features', 0) == ratio * getattr(student_layers[n], 'num_features', -1)]
    if not names:
        raise CheckpointError('no BatchNorm layer of the DT is a widened copy of one of the student\'s: '
                              'nothing to measure')
    outputs: Dict[str, Dict[str, torch.Tensor]] = {'dt': {}, 'student': {}}
    hooks = []
    for side, layers in (('dt', dt_layers), ('student', student_layers)):
        for name in names:
            hooks.append(layers[name].register_forward_hook(
                # a copy: the network adds its shortcut and applies its activation in place
                lambda _m, _a, out, side=side, name=name: outputs[side].__setitem__(name, out.clone())))
    sums = {name: _Sums() for name in names}
    hits = dict(student=0, dt=0, agree=0)
    seen = 0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            student_logits, dt_logits = model(x, mode='both')
            for name in names:
                sums[name].add(outputs['dt'][name], outputs['student'][name], ratio)
            s, d = student_logits.argmax(-1), dt_logits.argmax(-1)
            hits['student'] += (s == y).sum().item()
            hits['dt'] += (d == y).sum().item()
            hits['agree'] += (s == d).sum().item()
            seen += len(y)
    finally:
        for h in hooks:
            h.remove()
    return dict(images=seen, layers={name: sums[name].row() for name in names},
                top1={k: 100.0 * v / max(seen, 1) for k, v in hits.items() if k != 'agree'},
                agreement=100.0 * hits['agree'] / max(seen, 1))


def spread(checkpoint_path: str, data_dir: Optional[str], split: str, limit: Optional[int],
           batch_size: Optional[int], device: str = 'cpu') -> dict:
    device = torch.device(device)
    checkpoint, model = load_gpd_run(checkpoint_path)
    model = model.eval().to(device)
    ratio = integer_ratio(model)
    args = run_args(checkpoint, data_dir, None, batch_size)
    data_config = checkpoint.get('data_config') or train.resolve_data(args, model)
    train_ds, val_ds = train.build_datasets(args)
    _, val_loader, test_loader, _ = train.build_loaders(args, data_config, train_ds, val_ds)
    loader = val_loader if split == 'val' else test_loader
    if loader is None:
        raise train.UsageError(f'the run has no {split} split to measure on')
    result = measure(model, _first_images(loader, limit), ratio, device)
    result.update(checkpoint=str(checkpoint_path), split=split, ratio=ratio, epoch=checkpoint.get('epoch'))
    return result


def _first_images(loader, limit: Optional[int]):
    seen = 0
    for x, y in loader:
        if limit is not None and seen >= limit:
            return
        if limit is not None:
            x, y = x[:limit - seen], y[:limit - seen]
        seen += len(y)
        yield x, y


def stage_of(name: str) -> str:
    """ 'layer3.1.bn2' -> 'layer3': rows grouped the way timm's feature_info names stages. """
    return name.split('.')[0]


def report(result: dict) -> List[str]:
    lines = [f'{result["checkpoint"]} (epoch {result["epoch"]}): DT ratio {result["ratio"]}, '
             f'{result["images"]} {result["split"]} images',
             f'top-1: student {result["top1"]["student"]:.2f}  DT {result["top1"]["dt"]:.2f}  '
             f'same prediction on {result["agreement"]:.2f} % of images',
             f'{"layer":<28} {"replica spread":>15} {"DT vs student":>14}']
    for name, row in result['layers'].items():
        lines.append(f'{name:<28} {row["replica_spread"]:15.4f} {row["dt_vs_student"]:14.4f}')
    stages: Dict[str, List[dict]] = {}
    for name, row in result['layers'].items():
        stages.setdefault(stage_of(name), []).append(row)
    lines.append('per stage (mean over its layers):')
    for stage, rows in stages.items():
        lines.append(f'  {stage:<26} {sum(r["replica_spread"] for r in rows) / len(rows):15.4f} '
                     f'{sum(r["dt_vs_student"] for r in rows) / len(rows):14.4f}')
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True, nargs='+',
                   help='train.py GPD checkpoint(s) (last.pth, final.pth), measured one after the other')
    p.add_argument('--data-dir', help="dataset root (default: the run's)")
    p.add_argument('--split', choices=('val', 'test'), default='val',
                   help="the run's held-out validation images or its test split")
    p.add_argument('--limit', type=int, help='measure on the first N images only')
    p.add_argument('--batch-size', type=int, help="batch size (default: the run's validation batch size)")
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--results-file', help='also write the measures as JSON')
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error(f'--limit must be at least 1, got {args.limit}')
    results, status = [], 0
    for checkpoint in args.checkpoint:
        try:
            result = spread(checkpoint, args.data_dir, args.split, args.limit, args.batch_size, args.device)
        except (CheckpointError, train.UsageError) as e:
            print(f'{p.prog}: error: {e}', file=sys.stderr)
            status = 2  # the others are still measured
            continue
        print('\n'.join(report(result)), flush=True)
        results.append(result)
    if args.results_file:
        Path(args.results_file).write_text(json.dumps(results, indent=1) + '\n')
    return status


if __name__ == '__main__':
    sys.exit(main())
