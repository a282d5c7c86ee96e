"""Which of timm's model families does GPD cover exactly?

For every timm model module (``timm.list_modules()``: one per family, as timm splits its zoo), the
smallest registered model (fewest parameters, counted on the meta device, 10 classes) gets its
norm and layer-scale weights randomized as in ``tests/family_helpers.py`` (zero or constant
inits hide wrongly mixed channels), then is wrapped in ``GPDModel`` at ``--ratio`` with and
without CBR and checked: the DT's logits must equal the student view's on a random batch of the
smallest input the model accepts, and without CBR also the original student's. Each family ends
as one of

  exact     the DT was built and reproduces the student
  refused   GPD raised a clear error (NotImplementedError / ValueError of timm_gpd): stage
            ``plan`` = up front, ``check`` = the construction check caught it
  error     anything else: a crash, or a wrong DT that passed the construction check
  timeout   not finished within ``--time-limit`` (a large smallest model on a slow machine)
  no-model  the timm model itself could not be built or run on CPU (not GPD's fault)

Each family runs in its own process under a time limit; results are cached per family in
``coverage.json`` in the output folder, so a rerun skips what is done (``--rerun`` redoes).

    nice -n 10 python benchmarks/coverage.py                 # all families, ratio 2
    python benchmarks/coverage.py --modules swin_transformer levit --rerun
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, 'benchmarks', 'results', 'coverage')
MODES = ('plain', 'cbr')
NUM_CLASSES = 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ratio', type=float, default=2.0, help='gpd_ratio (default 2)')
    p.add_argument('--modules', nargs='+', default=None, help='timm model modules (default: all)')
    p.add_argument('--output', default=DEFAULT_OUT, help='results folder (coverage.json, coverage.md, coverage.txt)')
    p.add_argument('--time-limit', type=float, default=600, help='seconds per family (default 600)')
    p.add_argument('--rerun', action='store_true', help='redo families already in the cache')
    p.add_argument('--skip', nargs='+', default=(), help='modules to leave as they are in the cache')
    p.add_argument('--threads', type=int, default=1, help='torch threads per family process')
    p.add_argument('--one', default=None, help=argparse.SUPPRESS)  # worker: one module, JSON on stdout
    p.add_argument('--model', default=None, help=argparse.SUPPRESS)  # worker: the model chosen by an earlier run
    args = p.parse_args(argv)
    if args.ratio <= 1:
        p.error(f'--ratio must be > 1, got {args.ratio}')
    if args.time_limit <= 0:
        p.error(f'--time-limit must be > 0, got {args.time_limit}')
    return args


# ---------------------------------------------------------------- worker (one family per process)

def smallest_model(module: str):
    """(name, parameter count) of the module's model with the fewest parameters."""
    import timm
    import torch
    best = None
    for name in timm.list_models(module=module):
        try:
            with torch.device('meta'):
                model = timm.create_model(name, num_classes=NUM_CLASSES)
        except Exception:  # some models cannot be built on the meta device: counted below if none can
            continue
        count = sum(p.numel() for p in model.parameters())
        if best is None or count < best[1]:
            best = (name, count)
    if best is None:
        names = timm.list_models(module=module)
        if not names:
            raise LookupError(f'timm module {module!r} registers no model')
        best = (names[0], None)
    return best


def _refusal(e: BaseException) -> bool:
    """A clear refusal: a NotImplementedError / ValueError raised by timm_gpd itself."""
    if not isinstance(e, (NotImplementedError, ValueError)):
        return False
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and f'{os.sep}timm_gpd{os.sep}' in frames[-1].filename


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f'{type(e).__name__}: {text[0] if text else ""}'[:400]


def check_family(module: str, ratio: float, model: Optional[str] = None) -> Dict:
    import torch
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, 'tests'))
    import timm
    import timm_gpd
    from family_helpers import randomize_hidden
    from timm_gpd.reparam.widen import check_input, find_stem_and_classifier, max_logit_error

    result = {'module': module}
    start = time.time()
    try:
        name, count = (model, None) if model else smallest_model(module)
        torch.manual_seed(0)
        student = randomize_hidden(timm.create_model(name, num_classes=NUM_CLASSES)).eval()
        result.update(model=name, params=count or sum(p.numel() for p in student.parameters()))
        x = check_input(student, find_stem_and_classifier(student)[0])
        result['input'] = list(x.shape[1:])
        with torch.no_grad():
            reference = student(x)
    except Exception as e:
        result.update(status='no-model', reason=_first_line(e), seconds=round(time.time() - start, 1))
        return result
    result['select_seconds'] = round(time.time() - start, 1)
    for mode in MODES:
        t0 = time.time()
        out = {}
        try:
            gpd = timm_gpd.GPDModel(student, ratio=ratio, cbr=mode == 'cbr').eval()
            with torch.no_grad():
                s, t = gpd(x, mode='both')
            err, tol = max_logit_error(s, t)
            if mode == 'plain':  # without CBR the student view is the original student
                err = max(err, max_logit_error(reference, s)[0])
            out = {'status': 'exact' if err <= tol else 'error', 'max_err': err, 'tol': tol}
            if err > tol:
                out['reason'] = f'wrong DT passed the construction check: max |diff| {err:.3g} > {tol:.3g}'
            widths = sorted({getattr(m, 'out_channels', 0) for m in gpd.teacher.modules()} - {0})
            out['dt_params'] = sum(p.numel() for p in gpd.teacher.parameters())
            out['conv_widths'] = len(widths)
        except Exception as e:
            stage = 'check' if any('check_function_preserved' == f.name for f in traceback.extract_tb(e.__traceback__)) \
                else 'plan'
            out = {'status': 'refused' if _refusal(e) else 'error', 'stage': stage, 'reason': _first_line(e)}
        out['seconds'] = round(time.time() - t0, 1)
        result[mode] = out
    result['seconds'] = round(time.time() - start, 1)
    return result


# ---------------------------------------------------------------- driver

def load_cache(path: str) -> Dict[str, Dict]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    return data.get('families', {})


def write_atomic(path: str, text: str):
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-')
    with os.fdopen(fd, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


def run_one(module: str, args, model: Optional[str] = None) -> Dict:
    cmd = [sys.executable, os.path.abspath(__file__), '--one', module, '--ratio', str(args.ratio)]
    if model:  # chosen by an earlier run: skip the search over the module's models
        cmd += ['--model', model]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.time_limit, env=env)
    except subprocess.TimeoutExpired:
        return {'module': module, 'model': model or '?', 'status': 'timeout',
                'reason': f'time limit of {args.time_limit:g} s exceeded', 'seconds': round(time.time() - start, 1)}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
        return {'module': module, 'status': 'error', 'reason': f'worker exited {proc.returncode}: {tail}'[:400],
                'seconds': round(time.time() - start, 1)}
    return json.loads(lines[-1])


def family_status(r: Dict, mode: str) -> str:
    if r.get('status') == 'error' and r.get('reason', '').startswith('time limit'):
        return 'timeout'  # written by an earlier version of this script
    return r.get('status') or r.get(mode, {}).get('status', 'error')


def family_reason(r: Dict, mode: str) -> str:
    if r.get('status'):
        return r.get('reason', '')
    out = r.get(mode, {})
    return f"[{out.get('stage')}] {out.get('reason', '')}" if out.get('status') == 'refused' else out.get('reason', '')


def totals(results: Dict[str, Dict], mode: str) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for r in results.values():
        s = family_status(r, mode)
        counts[s] = counts.get(s, 0) + 1
    return counts


def render_text(results: Dict[str, Dict], ratio: float) -> str:
    lines = []
    for module in sorted(results):
        r = results[module]
        parts = []
        for mode in MODES:
            s = family_status(r, mode)
            reason = family_reason(r, mode)
            parts.append(f'{mode}={s}' + (f' ({reason})' if s != 'exact' and reason else ''))
        lines.append(f"{module:28s} {r.get('model', '?'):36s} " + ' | '.join(parts))
    for mode in MODES:
        t = totals(results, mode)
        lines.append(f'TOTAL {mode} (ratio {ratio:g}, {len(results)} families): '
                     + ', '.join(f'{k} {v}' for k, v in sorted(t.items())))
    return '\n'.join(lines) + '\n'


def render_markdown(results: Dict[str, Dict], ratio: float) -> str:
    rows = ['| timm module | smallest model | input | without CBR | with CBR |', '|---|---|---|---|---|']
    for module in sorted(results):
        r = results[module]
        cells = []
        for mode in MODES:
            s = family_status(r, mode)
            reason = family_reason(r, mode).replace('|', '/')
            cells.append(s if s == 'exact' else f'{s}: {reason}')
        size = 'x'.join(str(v) for v in r.get('input', [])[1:]) or '-'
        rows.append(f"| {module} | {r.get('model', '?')} | {size} | {cells[0]} | {cells[1]} |")
    rows.append('')
    for mode in MODES:
        t = totals(results, mode)
        rows.append(f'**{"without" if mode == "plain" else "with"} CBR** (ratio {ratio:g}, {len(results)} families): '
                    + ', '.join(f'{k} {v}' for k, v in sorted(t.items())) + '  ')
    return '\n'.join(rows) + '\n'


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        import torch
        torch.set_num_threads(args.threads)
        print(json.dumps(check_family(args.one, args.ratio, args.model)), flush=True)
        return 0
    import timm
    from tqdm import tqdm
    known = timm.list_modules()
    modules = args.modules or known
    unknown = [m for m in modules if m not in known]
    if unknown:
        print(f'error: not timm model modules: {", ".join(unknown)}', file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)
    suffix = '' if args.ratio == 2 else f'_r{args.ratio:g}'
    cache_path = os.path.join(args.output, f'coverage{suffix}.json')
    results = load_cache(cache_path)
    todo = [m for m in modules if (args.rerun and m not in args.skip) or m not in results]
    with tqdm(total=len(modules), initial=len(modules) - len(todo), unit='family') as bar:
        for module in todo:
            bar.set_postfix_str(module)
            results[module] = run_one(module, args, results.get(module, {}).get('model'))
            bar.update(1)
            tqdm.write(render_text({module: results[module]}, args.ratio).splitlines()[0])
            write_atomic(cache_path, json.dumps(
                {'ratio': args.ratio, 'timm': timm.__version__, 'families': results}, indent=1, sort_keys=True))
    # the summary files describe every family in the cache (a partial rerun updates its lines)
    everything = {m: results[m] for m in known if m in results}
    write_atomic(os.path.join(args.output, f'coverage{suffix}.txt'), render_text(everything, args.ratio))
    write_atomic(os.path.join(args.output, f'coverage{suffix}.md'), render_markdown(everything, args.ratio))
    print(render_text({m: results[m] for m in modules if m in results}, args.ratio), end='')
    return 0


if __name__ == '__main__':
    sys.exit(main())
