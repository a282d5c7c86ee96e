"""What does a GPD step cost against plain training and KD, and against its own floor?

For each student/teacher pair, times in one process, interleaved, median of repeats:

  plain        student step (CE)
  kd           student step with a static teacher (DKD)
  gpd          GPD step: static teacher, DT + CBR, shared student, one backward
  gpd_nocbr    the same without CBR
  parts        teacher forward | plain wide DT fwd+bwd | student fwd+bwd | optimizer step
               (the DT here is ``inverse_reparameterize`` output: stock modules, no CBR)
  floor_together  the floor's three parts in one step, all activations alive at once

floor = teacher forward + DT fwd+bwd + student fwd+bwd. Targets (``targets``): at 224 px
gpd <= 1.2 x floor, gpd_nocbr <= 1.05 x, peak memory of a GPD step <= 1.2 x the floor's parts
held together; below 224 px (32-64 px, where CBR's per-step work is not hidden by the convs)
gpd <= 1.4 x, gpd_nocbr <= 1.10 x, memory <= 1.5 x.
Peak memory is the rise above the memory held before the step (models, gradients, optimizer
state): CUDA max allocated on a GPU; on CPU the sampled RSS of a second process, started with
glibc's mmap threshold pinned so that freed tensors leave the RSS at once (that setting slows
every allocation down, so the times come from this process, under the default allocator).
Also: inference of the extracted student vs the stock timm model (should be ~1.00).

    python benchmarks/step_cost.py --img-size 64 --batch-size 16 --repeats 5
    python benchmarks/step_cost.py --device cuda --img-size 224 --batch-size 64 --channels-last --amp
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import timm_gpd  # noqa: E402
from timm_gpd.losses import DynamicTeacherKD, kd_loss_from_name  # noqa: E402
from timm_gpd.task import TrainTask  # noqa: E402
from timm_gpd.checkpoint import processor_name  # noqa: E402

DEFAULT_PAIRS = ('resnet18:resnet34', 'mobilenetv2_100:resnet50')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--pairs', nargs='+', default=list(DEFAULT_PAIRS), help='STUDENT:TEACHER timm names')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--img-size', type=int, default=None, help='default 224 on GPU, 64 on CPU')
    p.add_argument('--batch-size', type=int, default=None, help='default 64 on GPU, 16 on CPU')
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--gpd-ratio', type=float, default=2.0)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--amp', action='store_true', help='bf16 autocast')
    p.add_argument('--compile', action='store_true', help='torch.compile every model')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (CPU)')
    p.add_argument('--cpu-time', action='store_true',
                   help='time with the CPU time of this process instead of the wall clock (with --threads 1: '
                        'stable on a shared machine, where other processes stretch the wall clock)')
    p.add_argument('--cbr-layers', action='store_true',
                   help="also time each distinct CBR conv alone under every plan (what bounds CBR's cost)")
    p.add_argument('--results-file', default=None, help='write the measurements as JSON')
    p.add_argument('--memory-only', default=None, metavar='JSON', help=argparse.SUPPRESS)  # the CPU memory process
    args = p.parse_args(argv)
    gpu = args.device.startswith('cuda')
    args.img_size = args.img_size or (224 if gpu else 64)
    args.batch_size = args.batch_size or (64 if gpu else 16)
    return args


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory rise during a block: CUDA max allocated, or sampled RSS on CPU."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')

    def __enter__(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._rss()
            self._top = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._top = max(self._top, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._top, self._rss()) - self._base


def build(pair: str, args, device):
    student_name, teacher_name = pair.split(':')
    kw = dict(num_classes=args.num_classes)
    torch.manual_seed(0)
    student = timm.create_model(student_name, **kw)
    teacher = timm.create_model(teacher_name, **kw).eval().requires_grad_(False)
    models = {
        'student': student,
        'kd_student': copy.deepcopy(student),
        'teacher': teacher,
        'gpd': timm_gpd.GPDModel(student, ratio=args.gpd_ratio, check=False),
        'gpd_nocbr': timm_gpd.GPDModel(student, ratio=args.gpd_ratio, cbr=False, check=False),
        'wide': timm_gpd.inverse_reparameterize(student, ratio=args.gpd_ratio, check=False),
    }
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    for m in models.values():
        m.to(device=device, memory_format=fmt)
    return models


def make_steps(models, args, device):
    """name -> zero-arg callable doing one timed unit of work."""
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device, memory_format=fmt)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp else nullcontext
    maybe_compile = torch.compile if args.compile else (lambda m: m)
    teacher = maybe_compile(models['teacher'])
    ce = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    kd = kd_loss_from_name('dkd', alpha=1.0, beta=0.5)

    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)

    class _AutocastAccelerator:
        # TrainTask only needs autocast / backward / clip / unwrap from an accelerator
        def autocast(self):
            return autocast()

        def backward(self, loss):
            loss.backward()

        def clip_grad_norm_(self, params, max_norm):
            return torch.nn.utils.clip_grad_norm_(params, max_norm)

        def unwrap_model(self, m):
            return m

    acc = _AutocastAccelerator()
    tasks = {
        'plain': TrainTask(maybe_compile(models['student']), sgd(models['student']), ce, acc),
        'kd': TrainTask(maybe_compile(models['kd_student']), sgd(models['kd_student']), ce, acc,
                        static_teacher=teacher, kd_loss=kd),
        'gpd': TrainTask(maybe_compile(models['gpd']), sgd(models['gpd']), ce, acc, dynamic_teacher=True,
                         static_teacher=teacher, kd_loss=kd, dt_loss=DynamicTeacherKD(), clip_grad=5.0),
        'gpd_nocbr': TrainTask(maybe_compile(models['gpd_nocbr']), sgd(models['gpd_nocbr']), ce, acc,
                               dynamic_teacher=True, static_teacher=teacher, kd_loss=kd,
                               dt_loss=DynamicTeacherKD(), clip_grad=5.0),
    }
    wide, student = maybe_compile(models['wide'].train()), maybe_compile(models['student'])
    gpd_opt = tasks['gpd'].optimizer

    def fwd_bwd(model):
        model.zero_grad(set_to_none=True)
        with autocast():
            loss = ce(model(x), y)
        loss.backward()

    def teacher_forward():
        with torch.no_grad(), autocast():
            teacher(x)

    steps = {name: (lambda t=t: t.step(x, y)) for name, t in tasks.items()}
    steps.update({
        'teacher_fwd': teacher_forward,
        'dt_fwd_bwd': lambda: fwd_bwd(wide),
        'student_fwd_bwd': lambda: fwd_bwd(student),
        'optimizer': gpd_opt.step,  # grads are left in place by the last gpd step
    })

    def floor_held_together():
        # the floor's three parts with every activation alive at once: the memory reference
        wide.zero_grad(set_to_none=True)
        student.zero_grad(set_to_none=True)
        with autocast():
            with torch.no_grad():
                teacher(x)
            loss = ce(wide(x), y) + ce(student(x), y)
        loss.backward()

    # the memory reference, timed too: on CPU, holding both networks' activations at once can
    # slow a step down by itself, which the floor's standalone parts do not see
    steps['floor_together'] = floor_held_together
    return steps, x


def time_steps(steps, args, device):
    # CPU time of this process: with one thread, what a step costs whatever else runs on the machine
    clock = time.process_time if getattr(args, 'cpu_time', False) else time.perf_counter
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    _sync(device)
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, fn in steps.items():  # interleaved: drifts in clock or load hit every step alike
            _sync(device)
            start = clock()
            fn()
            _sync(device)
            times[name].append(clock() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def inference_parity(models, x, args, device):
    gpd = models['gpd']
    extracted = gpd.extract_student().to(device)
    stock = timm.create_model(gpd.student_arch, num_classes=args.num_classes).to(device).eval()
    stock.load_state_dict(extracted.state_dict(), strict=True)
    fns = {}
    for name, m in (('extracted', extracted), ('stock', stock)):
        def run(m=m):
            with torch.no_grad():
                m(x)
        fns[name] = run
    # inference is cheap next to a training step: more repeats keep the ratio's noise below 1 %
    t = time_steps(fns, argparse.Namespace(warmup=args.warmup, repeats=max(4 * args.repeats, 20), cpu_time=args.cpu_time), device)
    return t['extracted'] / t['stock']


def measure_memory(steps, device) -> dict:
    units = {'floor_held_together': steps['floor_together'], **{k: steps[k] for k in ('gpd', 'gpd_nocbr', 'kd')}}
    mem = {}
    for name, fn in units.items():
        fn()  # the gradients and optimizer state it keeps belong to the baseline, not the peak
        with PeakMemory(device) as pm:
            fn()
        mem[name] = pm.peak
    return mem


# glibc keeps freed heap memory and raises its mmap threshold as large blocks are freed, so
# after warm-up the RSS no longer rises during a step, whatever it allocates. A pinned mmap
# threshold maps and unmaps every tensor of 64 KiB or more: the RSS follows live memory.
# glibc reads these at start-up only, hence a separate process.
MEMORY_PROBE_ENV = {'MALLOC_MMAP_THRESHOLD_': '65536', 'MALLOC_TRIM_THRESHOLD_': '0'}


def memory_in_subprocess(pair, argv) -> dict:
    """Peak memory of each step on CPU, measured in a fresh process under MEMORY_PROBE_ENV."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'memory.json')
        cmd = [sys.executable, os.path.abspath(__file__), *argv, '--pairs', pair, '--memory-only', out]
        env = dict(os.environ, **MEMORY_PROBE_ENV)
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)


def cbr_plans(model, x) -> dict:
    """How many CBR convs of the GPD model (DT and student) merge which branches at this input."""
    from timm_gpd.reparam.branches import BRANCHES
    counts = {}

    def record(module, inp):
        merged = module.plan(inp)
        key = 'merge ' + '+'.join(b for b in BRANCHES if b in merged) if merged else 'all on activations'
        counts[key] = counts.get(key, 0) + 1

    _visit_cbr_calls(model, x, record)
    return counts


def _visit_cbr_calls(model, x, visit):
    """One no-grad forward of both modes, calling ``visit(module, input)`` at every CBR conv call."""
    from timm_gpd.reparam.branches import CBRConv2d
    hooks = [m.register_forward_pre_hook(lambda module, inputs: visit(module, inputs[0]))
             for m in model.modules() if isinstance(m, CBRConv2d)]
    try:
        with torch.no_grad():
            model(x, mode='both')
    finally:
        for h in hooks:
            h.remove()


def cbr_layer_costs(model, x, args, device) -> list:
    """Each distinct CBR conv of the GPD model (DT and student) at its input in this step, timed
    forward + backward: as a plain conv with one kernel (what the floor runs), under the plan the
    cost model picks, and under the fixed plans. Bounds what CBR can cost at this input size."""
    from timm_gpd.reparam.branches import BRANCHES, CBRConv2d
    seen = {}

    def record(module, inp):
        key = (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
               module.dilation, module.groups, tuple(inp.shape))
        seen.setdefault(key, [module, 0])[1] += 1

    _visit_cbr_calls(model, x, record)
    rows = []
    for key, (module, count) in seen.items():
        # a fresh conv of the same configuration: the student's CBR convs hold no parameters
        has_bias = module._parameters.get('bias', 0) is not None
        m = CBRConv2d.from_conv(torch.nn.Conv2d(*key[:7], bias=has_bias)).to(device)
        inp = torch.randn(key[-1], device=device, requires_grad=True)
        kernel = m.weight.detach().clone().requires_grad_(True)
        plans = {'chosen': m.plan(inp), 'merge_all': frozenset(BRANCHES), 'all_on_activations': frozenset(),
                 'mix_kxk_on_activations': frozenset(BRANCHES) - {'mix_kxk'}}

        def fwd_bwd(plan=None):
            if plan is None:  # the stock conv, as the floor's DT runs it
                out = torch.nn.functional.conv2d(inp, kernel, None, m.stride, m.padding, m.dilation, m.groups)
            else:
                out = m(inp, merge=plan)
            out.backward(torch.ones_like(out))
            m.zero_grad(set_to_none=True)
            kernel.grad = inp.grad = None

        fns = {'plain_conv': fwd_bwd, **{name: (lambda p=p: fwd_bwd(p)) for name, p in plans.items()}}
        t = time_steps(fns, argparse.Namespace(warmup=1, repeats=3, cpu_time=args.cpu_time), device)
        rows.append({'conv': f'{key[0]}->{key[1]} k{key[2]} g{key[6]}', 'input': list(key[-1]), 'count': count,
                     'chosen': sorted(plans['chosen']), 'times_s': t})
    return rows


def measure_pair(pair, args, argv):
    device = torch.device(args.device)
    models = build(pair, args, device)
    steps, x = make_steps(models, args, device)
    t = time_steps(steps, args, device)
    floor = t['teacher_fwd'] + t['dt_fwd_bwd'] + t['student_fwd_bwd']
    parts = floor + t['optimizer']
    if device.type == 'cuda':
        mem = measure_memory(steps, device)
    else:
        mem = memory_in_subprocess(pair, argv)
    return {
        'pair': pair, 'times_s': t,
        'gpd/kd': t['gpd'] / t['kd'],
        'gpd/parts': t['gpd'] / parts,
        'gpd_nocbr/floor': t['gpd_nocbr'] / floor,
        'gpd/floor': t['gpd'] / floor,
        'gpd_nocbr/floor_together': t['gpd_nocbr'] / t['floor_together'],
        'gpd/floor_together': t['gpd'] / t['floor_together'],
        'peak_bytes': mem,
        'mem gpd/floor': mem['gpd'] / max(mem['floor_held_together'], 1),
        'mem gpd_nocbr/floor': mem['gpd_nocbr'] / max(mem['floor_held_together'], 1),
        'extracted/stock inference': inference_parity(models, x, args, device),
        'cbr plans': cbr_plans(models['gpd'], x),
        'cbr layers': cbr_layer_costs(models['gpd'], x, args, device) if args.cbr_layers else None,
    }


def targets(img_size: int) -> dict:
    """The step-cost goals at this input size: GPD / floor with and without CBR, peak memory / floor."""
    if img_size >= 224:
        return {'gpd_nocbr/floor': 1.05, 'gpd/floor': 1.2, 'mem gpd/floor': 1.2}
    return {'gpd_nocbr/floor': 1.10, 'gpd/floor': 1.4, 'mem gpd/floor': 1.5}


def describe_device(device: str) -> str:
    if device.startswith('cuda'):
        return torch.cuda.get_device_name(device)
    return f'{processor_name()}, {torch.get_num_threads()} threads'


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_only:
        device = torch.device(args.device)
        models = build(args.pairs[0], args, device)
        steps, _ = make_steps(models, args, device)
        with open(args.memory_only, 'w') as f:
            json.dump(measure_memory(steps, device), f)
        return
    header = (f'device: {describe_device(args.device)} | torch {torch.__version__} | img {args.img_size} '
              f'batch {args.batch_size} ratio {args.gpd_ratio} | channels_last={args.channels_last} '
              f'amp={args.amp} compile={args.compile} | {"CPU time" if args.cpu_time else "wall clock"} | '
              f'{time.strftime("%Y-%m-%d %H:%M %Z")} | '
              f'load average {os.getloadavg()[0]:.2f} (other processes share the machine when > 0)')
    print(header)
    results = []
    goals = targets(args.img_size)
    for pair in args.pairs:
        r = measure_pair(pair, args, argv)
        results.append(r)
        t = r['times_s']
        print(f'\n{pair}: median of {args.repeats} (ms)')
        print('  ' + '  '.join(f'{k}={v * 1e3:.1f}' for k, v in t.items()))
        for key in ('gpd/kd', 'gpd/parts', 'gpd_nocbr/floor', 'gpd/floor', 'gpd_nocbr/floor_together',
                    'gpd/floor_together', 'mem gpd/floor',
                    'mem gpd_nocbr/floor', 'extracted/stock inference'):
            target = f' (target <= {goals[key]:.2f})' if key in goals else ''
            print(f'  {key:28s} {r[key]:.3f}{target}')
        print('  peak MiB: ' + '  '.join(f'{k}={v / 2**20:.0f}' for k, v in r['peak_bytes'].items()))
        print('  CBR convs: ' + ', '.join(f'{n} {k}' for k, n in r['cbr plans'].items()))
        for row in r['cbr layers'] or ():
            print(f"  CBR {row['conv']} at {row['input']} x{row['count']} (chosen: {'+'.join(row['chosen']) or 'none merged'}): "
                  + '  '.join(f'{k}={v * 1e3:.1f}' for k, v in row['times_s'].items()) + ' ms')
        print(f'  load average at the end: {os.getloadavg()[0]:.2f}')
    if args.results_file:
        with open(args.results_file, 'w') as f:
            json.dump({'header': header, 'args': vars(args), 'results': results}, f, indent=2)


if __name__ == '__main__':
    main()
