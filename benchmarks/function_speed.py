"""How fast does each network of GPD learn, against a student trained alone at the same lr?

Hard sharing and the replica layout change how far one SGD step moves each network's function: the
student's dense weights are `ratio` times a slice of the DT's, and the DT spreads every weight over
`ratio` replicas. This measures it directly. From the same weights, one plain SGD step (no momentum,
no weight decay, a small lr so that first order holds) on a training batch, then the change of the
logits on a separate batch, for:

  student alone     the plain timm student (extracted from the GPD model) on its own loss: the
                    baseline's step, the unit
  DT                the dynamic teacher on its own loss
  GPD student       the student's own loss through the shared weights, as published (coupled)
  decoupled         the same with --gpd-decouple-student

Each is printed as ||change of logits|| relative to the student alone's, averaged over --batches
training batches (train-mode BatchNorm for the step and the measure). A network at 2x moves its
function as a student alone would at about twice the lr, so the ratios say at which lr, in the
baseline's terms, each network of a GPD run at lr x trains.

    python benchmarks/function_speed.py --data-dir data                          # resnet18 at init
    python benchmarks/function_speed.py --data-dir data --checkpoint RUN/final.pth  # trained weights
"""
import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's timm_gpd, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parent))
import timm  # noqa: E402

import timm_gpd  # noqa: E402,F401
from gap_probe import load_gpd_run, loader  # noqa: E402  (the study's training split and augmentation)
from timm_gpd.checkpoint import CheckpointError  # noqa: E402
from timm_gpd.reparam import GPDModel  # noqa: E402

NETWORKS = ('dt', 'student', 'decoupled')


def sgd_step(model: nn.Module, loss: Callable[[], torch.Tensor], lr: float):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss(), params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.sub_(lr * g)


def logit_change(model: nn.Module, forward: Callable[[nn.Module], torch.Tensor], loss: Callable[[nn.Module], torch.Tensor],
                 lr: float) -> float:
    """ ||logits after - before|| on the measuring batch, after one SGD step of `loss` on a copy. """
    moved = copy.deepcopy(model).train()
    with torch.no_grad():
        before = forward(moved)
    sgd_step(moved, lambda: loss(moved), lr)
    with torch.no_grad():
        return (forward(moved) - before).norm().item()


def speeds(model: GPDModel, alone: nn.Module, train_batch, xp: torch.Tensor, lr: float) -> Dict[str, float]:
    """ Each network's logit change from one step, relative to the plain student's alone. """
    x, y = train_batch
    unit = logit_change(alone, lambda m: m(xp), lambda m: F.cross_entropy(m(x), y), lr)
    out = {'dt': logit_change(model, lambda m: m(xp, mode='teacher'),
                              lambda m: F.cross_entropy(m(x, mode='teacher'), y), lr)}
    for name, decoupled in (('student', False), ('decoupled', True)):
        def student_loss(moved: GPDModel, decoupled=decoupled) -> torch.Tensor:
            # on logit_change's copy; through the shared tensors, as training computes it (mode='both')
            moved.decouple_student = decoupled
            return F.cross_entropy(moved(x, mode='both')[0], y)
        out[name] = logit_change(model, lambda m: m(xp, mode='student'), student_loss, lr)
    return {k: v / unit for k, v in out.items()}


def measure(model: GPDModel, batches, probe, lr: float) -> Dict[str, float]:
    alone = model.extract_student()  # the same weights as a plain timm student: the unit
    rows = [speeds(model, alone, b, probe, lr) for b in batches]
    return {k: sum(r[k] for r in rows) / len(rows) for k in NETWORKS}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='resnet18', help='student architecture when no --checkpoint is given')
    p.add_argument('--checkpoint', help='a train.py GPD checkpoint: measure at its weights instead of at init')
    p.add_argument('--data-dir', type=Path, default=Path(__file__).resolve().parents[1] / 'data')
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--batches', type=int, default=4, help='training batches to average over')
    p.add_argument('--lr', type=float, default=1e-3, help='small, so that one step is first order')
    p.add_argument('--gpd-ratio', type=float, default=2.0)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--results-file', type=Path, help='also write the ratios as JSON')
    args = p.parse_args(argv)
    if args.batches < 1 or args.lr <= 0:
        p.error('--batches must be >= 1 and --lr > 0')
    if not (args.data_dir / 'FashionMNIST' / 'raw' / 'train-images-idx3-ubyte').exists():
        p.error(f'no Fashion-MNIST under --data-dir {args.data_dir} (scripts/get_fashion_mnist.sh lays it out)')
    torch.manual_seed(args.seed)
    try:
        if args.checkpoint:
            checkpoint, model = load_gpd_run(args.checkpoint)
            args.model, args.img_size = checkpoint['arch'], checkpoint.get('img_size') or args.img_size
        else:
            model = GPDModel(timm.create_model(args.model, num_classes=10, in_chans=1), ratio=args.gpd_ratio,
                             seed=args.seed)
    except CheckpointError as e:
        print(f'{p.prog}: error: {e}', file=sys.stderr)
        return 2
    data = iter(loader(args.data_dir, args.img_size, args.batch_size, args.seed))
    probe = next(data)[0]
    batches = [next(data) for _ in range(args.batches)]
    result = measure(model, batches, probe, args.lr)
    where = f'from {args.checkpoint}' if args.checkpoint else 'at init'
    print(f'{args.model} ratio {model.ratio} {where}: logit change of one SGD step (lr {args.lr:g}, batch '
          f'{args.batch_size}, mean of {args.batches}) relative to the student trained alone')
    print(f'  DT on its own loss             {result["dt"]:6.2f}x')
    print(f'  GPD student (published)        {result["student"]:6.2f}x')
    print(f'  GPD student (decoupled)        {result["decoupled"]:6.2f}x')
    if args.results_file:
        args.results_file.write_text(json.dumps(dict(model=args.model, ratio=model.ratio, checkpoint=args.checkpoint,
                                                     lr=args.lr, batch_size=args.batch_size, **result), indent=1) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
