"""Why does the dynamic teacher (DT) not lead its student? Measure how the two losses pull on the
weights they share, along a GPD run from scratch (train.py's loss, optimizer and clipping).

The student's weights are a scaled view of the DT's primary block, so one SGD step on the summed
loss moves that block by the DT's own gradient g_DT plus the student's g_S. Every --every steps,
averaged over --probe-batches training batches, this prints:

  S/DT norm     ||g_S|| / ||g_DT|| on the primary block: who drives the shared weights
  cos           cosine of g_S and g_DT on the primary block
  interference  <g_DT, g_S> / ||g_DT||^2 over all DT weights: the first-order change of the DT's
                loss caused by the student's part of a step, relative to the decrease its own part
                brings (-1: the student's part undoes the DT's progress; > 0: it helps)
  DT->S         <g_DT, g_S> / ||g_S||^2: the same for the student's loss and the DT's part of a step
  clip          the factor clipping applies to the whole step (1: no clipping)
  DT / S loss, the student's CE (its loss without the DT term) and top-1 on the probe batches

    python benchmarks/gap_probe.py --steps 400 --every 50                  # the published method
    python benchmarks/gap_probe.py --steps 400 --every 50 --decouple-student
    python benchmarks/gap_probe.py --checkpoint RUN/last.pth --steps 0     # a train.py GPD checkpoint
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's timm_gpd, not an installed one
import timm  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

import timm_gpd  # noqa: E402,F401
from timm_gpd.checkpoint import CheckpointError, build_model, load_checkpoint  # noqa: E402
from timm_gpd.losses import DynamicTeacherKD  # noqa: E402
from timm_gpd.models._builder import FMNIST_DATA_CFG  # noqa: E402
from timm_gpd.reparam import GPDModel  # noqa: E402
from timm_gpd.task import TrainTask  # noqa: E402

def loader(data_dir: Path, img_size: int, batch_size: int, seed: int):
    tf = transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(0.5, 1.0)), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(FMNIST_DATA_CFG['mean'], FMNIST_DATA_CFG['std'])])
    ds = datasets.FashionMNIST(str(data_dir), train=True, transform=tf, download=False)
    ds = torch.utils.data.Subset(ds, range(55000))  # the study's training split (the tail validates)
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True, generator=g)


def load_gpd_run(path) -> Tuple[dict, GPDModel]:
    """ A train.py GPD checkpoint and the model it holds; one without a dynamic teacher (no --gpd,
    or --gpd-cbr-only) is refused: there is no DT to measure. """
    checkpoint = load_checkpoint(path)
    if checkpoint.get('gpd') is None or checkpoint['gpd'].get('cbr_only'):
        raise CheckpointError(f'{path} is not a GPD checkpoint with a dynamic teacher (train.py --gpd)')
    return checkpoint, build_model(checkpoint, source=str(path))


def flat(grads, params):
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def probe(task: TrainTask, model: GPDModel, batches, clip: float) -> dict:
    """ The gradients of the student's and the DT's losses, separately, on the same batches. """
    params = [p for p in model.parameters() if p.requires_grad]
    g_s = g_dt = None
    stats = dict(dt_loss=0.0, s_loss=0.0, s_ce=0.0, dt_top1=0.0, s_top1=0.0)
    model.train()
    for x, y in batches:
        zs, zd, teacher = task.logits(x)  # one forward: its logits give the losses and the top-1
        parts = task.loss_parts(zs, zd, teacher, y)
        student = parts['student_ce'] + parts.get('student_kd', 0) + parts['student_dt']
        dt = parts['dt_ce'] + parts.get('dt_kd', 0)
        gs = flat(torch.autograd.grad(student, params, retain_graph=True, allow_unused=True), params)
        gd = flat(torch.autograd.grad(dt, params, allow_unused=True), params)
        g_s = gs if g_s is None else g_s + gs
        g_dt = gd if g_dt is None else g_dt + gd
        stats['dt_loss'] += dt.item()
        stats['s_loss'] += student.item()
        stats['s_ce'] += parts['student_ce'].item()
        stats['dt_top1'] += (zd.argmax(1) == y).float().mean().item() * 100
        stats['s_top1'] += (zs.argmax(1) == y).float().mean().item() * 100
    n = len(batches)
    g_s, g_dt = g_s / n, g_dt / n
    stats = {k: v / n for k, v in stats.items()}
    primary = g_s != 0  # the student reads the DT's primary block only
    gs_p, gd_p = g_s[primary], g_dt[primary]
    total = (g_s + g_dt).norm().item()
    stats.update(
        s_dt_norm=gs_p.norm().item() / max(gd_p.norm().item(), 1e-12),
        cos=torch.nn.functional.cosine_similarity(gs_p, gd_p, dim=0).item(),
        interference=(g_dt @ g_s).item() / max((g_dt @ g_dt).item(), 1e-12),
        dt_on_student=(g_dt @ g_s).item() / max((g_s @ g_s).item(), 1e-12),
        clip=min(1.0, clip / total) if clip else 1.0,
        primary_fraction=primary.float().mean().item(),
    )
    return stats


def main(argv=None) -> int:
    try:
        return run(argv)
    except CheckpointError as e:
        print(f'gap_probe.py: error: {e}', file=sys.stderr)
        return 2


def run(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='resnet18')
    p.add_argument('--checkpoint', type=Path,
                   help="start from a train.py GPD checkpoint (its DT and student; the optimizer starts afresh: "
                        "momentum is not carried over) instead of a new --model")
    p.add_argument('--data-dir', type=Path, default=Path(__file__).resolve().parents[1] / 'data')
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--lr', type=float, default=0.1)
    p.add_argument('--weight-decay', type=float, default=5e-5)
    p.add_argument('--clip-grad', type=float, default=5.0, help="train.py's default with --gpd")
    p.add_argument('--gpd-ratio', type=float, default=2.0)
    p.add_argument('--gpd-dt-weight', type=float, default=3.0)
    p.add_argument('--decouple-student', action='store_true')
    p.add_argument('--steps', type=int, default=400)
    p.add_argument('--every', type=int, default=50)
    p.add_argument('--probe-batches', type=int, default=4)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--results-file', type=Path, help='append one JSON line per probe')
    args = p.parse_args(argv)
    if args.every < 1 or args.steps < 0 or args.probe_batches < 1:
        p.error('--every and --probe-batches must be >= 1, --steps >= 0')
    if not (args.data_dir / 'FashionMNIST' / 'raw' / 'train-images-idx3-ubyte').exists():
        p.error(f'no Fashion-MNIST under --data-dir {args.data_dir} (scripts/get_fashion_mnist.sh lays it out)')
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    if args.checkpoint:
        checkpoint, model = load_gpd_run(args.checkpoint)
        model.decouple_student = args.decouple_student
        args.model, args.gpd_ratio = checkpoint['arch'], model.ratio
        args.img_size = checkpoint.get('img_size') or args.img_size
    else:
        student = timm.create_model(args.model, num_classes=10, in_chans=1)
        model = GPDModel(student, ratio=args.gpd_ratio, seed=args.seed, decouple_student=args.decouple_student)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    task = TrainTask(model, opt, LabelSmoothingCrossEntropy(0.1), dynamic_teacher=True,
                     dt_loss=DynamicTeacherKD(args.gpd_dt_weight), clip_grad=args.clip_grad)
    data = iter(loader(args.data_dir, args.img_size, args.batch_size, args.seed))
    warmup = min(args.steps, 100)  # train.py warms up over its first epoch; 100 steps here

    head = (f'{"step":>5} {"S/DT norm":>9} {"cos":>6} {"interf.":>8} {"DT->S":>6} {"clip":>5} {"DT loss":>8} '
            f'{"S loss":>7} {"S CE":>6} {"DT top1":>8} {"S top1":>7}')
    print(f'{args.model} ratio {args.gpd_ratio} lr {args.lr} batch {args.batch_size} '
          f'{"from " + str(args.checkpoint) + " " if args.checkpoint else ""}'
          f'{"decoupled student" if args.decouple_student else "published method"}\n{head}', flush=True)
    start = time.time()
    for step in range(args.steps + 1):
        if step % args.every == 0:
            batches = [next(data) for _ in range(args.probe_batches)]
            s = probe(task, model, batches, args.clip_grad)
            columns = [(s['s_dt_norm'], 9, 2), (s['cos'], 6, 2), (s['interference'], 8, 2),
                       (s['dt_on_student'], 6, 2), (s['clip'], 5, 2), (s['dt_loss'], 8, 3), (s['s_loss'], 7, 3),
                       (s['s_ce'], 6, 3), (s['dt_top1'], 8, 1), (s['s_top1'], 7, 1)]
            print(f'{step:>5} ' + ' '.join(f'{v:>{w}.{d}f}' for v, w, d in columns), flush=True)
            if args.results_file:
                with open(args.results_file, 'a') as f:
                    f.write(json.dumps(dict(step=step, lr=args.lr, decoupled=args.decouple_student,
                                            model=args.model, **s)) + '\n')
        if step == args.steps:
            break
        for group in opt.param_groups:
            group['lr'] = args.lr * min(1.0, (step + 1) / warmup)
        x, y = next(data)
        task.step(x, y)
    print(f'{args.steps} steps in {(time.time() - start) / 60:.1f} min')
    return 0


if __name__ == '__main__':
    sys.exit(main())
