"""What does a training batch cost to load: timm's PIL transforms in loader workers, or
``train.py --device-augment`` on the device?

Builds both training loaders exactly as train.py does (its ``build_loaders``, the study's recipe:
Fashion-MNIST, 1 x 32 x 32, random resized crop scale 0.5-1, flip, color jitter 0.4) and times,
side by side in one process, the median seconds per batch of

  pil_workers   the DataLoader with --workers processes (what a run waits for)
  pil_inline    the same transforms in this process (--workers 0: one core's cost per batch)
  device        DeviceTrainLoader on --device (crop, flip, jitter, normalize on the device)

A run whose step is shorter than its loader's batch time waits for data; cores spent on PIL
transforms are the ones a GPU's kernel launches need when several runs share a machine.

    python benchmarks/loader_cost.py --data-dir data --batch-size 512 --workers 2
    python benchmarks/loader_cost.py --data-dir data --device cuda --batch-size 512 --workers 2
"""
import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's train.py
import train  # noqa: E402  (its loaders, as a run builds them)
from timm_gpd.checkpoint import processor_name  # noqa: E402

# one validation image: the device loader caches the evaluation images, which nothing here times
RECIPE = ['--dataset', 'torch/fashion_mnist', '--model', 'resnet18', '--in-chans', '1', '--img-size', '32',
          '--scale', '0.5', '1.0', '--color-jitter', '0.4', '--val-limit', '1']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', default='data')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--batch-size', type=int, default=512)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--batches', type=int, default=10, help='timed batches per loader')
    return p.parse_args(argv)


def seconds_per_batch(loader, batches: int, device: torch.device) -> float:
    times, iterator = [], iter(loader)
    next(iterator)  # worker start-up and first-batch costs are not per batch
    for _ in range(batches):
        start = time.perf_counter()
        x, _ = next(iterator)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loaders(data_dir: str, batch_size: int, workers: int, device: torch.device):
    data_config = {'input_size': (1, 32, 32), 'interpolation': 'bilinear', 'mean': (0.2860,), 'std': (0.3530,),
                   'crop_pct': 0.875, 'crop_mode': 'center'}
    common = RECIPE + ['--data-dir', data_dir, '--batch-size', str(batch_size)]
    # what build_loaders reads of an Accelerator
    place = SimpleNamespace(device=device, num_processes=1, process_index=0)
    out = {}
    for name, extra in (('pil_workers', ['--workers', str(workers)]), ('pil_inline', ['--workers', '0']),
                        ('device', ['--device-augment'])):
        args = train.parse_args(common + extra)
        train_ds, val_ds = train.build_datasets(args)
        out[name] = train.build_loaders(args, data_config, train_ds, val_ds, place)[0]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    try:
        built = loaders(args.data_dir, args.batch_size, args.workers, device)
    except train.UsageError as e:  # e.g. no Fashion-MNIST under --data-dir
        print(f'loader_cost.py: error: {e}', file=sys.stderr)
        return 2
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else processor_name()
    print(f'device: {where} | {torch.get_num_threads()} threads | torch {torch.__version__} | batch '
          f'{args.batch_size} of 1x32x32 | workers {args.workers} | median of {args.batches} batches | '
          f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} | load average {os.getloadavg()[0]:.2f}')
    seconds = {name: seconds_per_batch(loader, args.batches, device) for name, loader in built.items()}
    for name, s in seconds.items():
        print(f'  {name:12s} {1000 * s:9.2f} ms per batch  {args.batch_size / s:9.0f} images/s')
    for name in ('pil_workers', 'pil_inline'):
        print(f'  {name + "/device":20s} {seconds[name] / seconds["device"]:.2f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
