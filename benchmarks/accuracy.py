"""Accuracy study for issue 6: does GPD beat baseline / KD / DKD on real images?

Drives train.py, one subprocess per run, over regimes (full data, 10 % of it) x methods x seeds,
after training one static resnet34 teacher per regime, then collects every run's summary.csv
into one table (final and best student top-1, mean +- std over seeds) and two plots.

    python benchmarks/accuracy.py --quick                  # CPU smoke run, ~30-45 min on 2 idle cores
    python benchmarks/accuracy.py --full                   # GPU: whole training set, 3 seeds
    python benchmarks/accuracy.py --quick --dry-run        # print the train.py commands, run nothing
    python benchmarks/accuracy.py --quick --only baseline gpd_scratch --seeds 0
    python benchmarks/accuracy.py --quick --collect-only   # rebuild tables and plots from the runs
    python benchmarks/accuracy.py --quick --regimes full --epochs-scale 4 --output DIR   # a longer run

What each run does lives in YAML, not here: benchmarks/configs/recipe.yaml (shared recipe),
<method>.yaml (one per setting, incl. teacher.yaml) and profile_<quick|full>.yaml (sizes, lr,
epochs, regimes, seeds). Interrupting is safe: finished runs are skipped, a run with a
last.pth resumes from it, and a run dir without one is started afresh.

--output (default benchmarks/results/<profile>) holds:
  runs/<regime>-<method>-s<seed>/  train.py's output: summary.csv, args.yaml, student.safetensors
                                   (+ last.pth while unfinished; kept only with --keep-checkpoints)
  runs/<regime>-teacher/           the static teacher of that regime
  logs/<run>.log                   train.py's stdout and stderr
  accuracy.csv, accuracy.md        per (regime, method): top-1 mean +- std over seeds
  comparisons.csv, comparisons.md  the paper's claims as paired (same seed) differences
  runs.csv                         one line per finished run
  top1_per_epoch.png, gap_per_epoch.png
"""
import argparse
import csv
import math
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / 'benchmarks' / 'configs'
TEACHER = 'teacher'
TEACHER_SEED = 0
# run order within a (seed, regime): a setting's start_from run must come before it
METHODS = ('baseline', 'baseline_r2lr', 'kd', 'dkd', 'cbr_only', 'gpd_scratch', 'gpd_dkd', 'finetune_plain', 'finetune_gpd')
# args.yaml keys that may differ between an interrupted run and its continuation
ARGS_FREE_TO_CHANGE = {'data_dir', 'workers', 'log_interval', 'validation_batch_size'}
RUN_NAME = re.compile(r'^(?P<regime>[a-z0-9_]+)-(?P<method>[a-z0-9_]+?)(?:-s(?P<seed>\d+))?$')


# ---------------------------------------------------------------- plan

@dataclass(frozen=True)
class Run:
    name: str            # folder under runs/, also train.py's --experiment
    regime: str
    method: str          # one of METHODS, or TEACHER
    seed: int
    args: dict           # train.py arguments (keys with '_'), without --output/--experiment/--resume
    needs: Tuple[str, ...] = ()  # runs whose student.safetensors this one reads

    @property
    def epochs(self) -> int:
        return int(self.args['epochs'])


def load_yaml(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def load_settings() -> Dict[str, dict]:
    return {m: load_yaml(CONFIG_DIR / f'{m}.yaml') for m in (TEACHER, *METHODS)}


def uses_static_teacher(setting: dict) -> bool:
    return bool(setting.get('train', {}).get('teacher'))


def run_name(regime: str, method: str, seed: Optional[int] = None) -> str:
    return f'{regime}-{method}' if seed is None else f'{regime}-{method}-s{seed}'


def with_dependencies(methods: Sequence[str], settings: Dict[str, dict]) -> List[str]:
    """ The selected methods plus the runs they start from (a fine-tune needs its baseline). """
    wanted = set(methods)
    for m in methods:
        if settings[m].get('start_from'):
            wanted.add(settings[m]['start_from'])
    return [m for m in METHODS if m in wanted]


def make_run(regime: str, method: str, seed: int, recipe: dict, profile: dict, setting: dict,
             runs_dir: Path, data_dir: Path) -> Run:
    """ Merge recipe < profile < setting < fine-tune overrides < regime and run specifics. """
    sizes = profile['regimes'][regime]
    start_from = setting.get('start_from')
    args = {**recipe, **profile.get('train', {}), **setting.get('train', {})}
    if start_from:
        args.update(profile.get('finetune', {}))
    if setting.get('lr_scale'):
        args['lr'] = args['lr'] * setting['lr_scale']
    args.update(
        data_dir=str(data_dir),
        train_limit=sizes.get('train_limit'),  # None: the whole training split
        epochs=sizes['finetune_epochs' if start_from else 'epochs'] * int(setting.get('epochs_scale', 1)),
        seed=seed,
    )
    if args.get('gpd'):
        args['gpd_seed'] = seed  # the CBR init and DT noise are part of what a seed varies
    needs = []
    if args.get('teacher'):
        teacher = run_name(regime, TEACHER)
        args['teacher_checkpoint'] = str(runs_dir / teacher / 'student.safetensors')
        needs.append(teacher)
    if start_from:
        source = run_name(regime, start_from, seed)
        args['initial_checkpoint'] = str(runs_dir / source / 'student.safetensors')
        needs.append(source)
    name = run_name(regime, method) if method == TEACHER else run_name(regime, method, seed)
    return Run(name, regime, method, seed, args, tuple(needs))


def build_plan(profile: dict, methods: Sequence[str], seeds: Sequence[int], runs_dir: Path,
               data_dir: Path) -> List[Run]:
    """ Every run in execution order: the teachers first, then seed by seed, so an interrupted
    benchmark already has every method for its first seeds. """
    recipe = load_yaml(CONFIG_DIR / 'recipe.yaml')
    settings = load_settings()
    methods = with_dependencies(methods, settings)
    regimes = list(profile['regimes'])
    plan = []
    if any(uses_static_teacher(settings[m]) for m in methods):
        for regime in regimes:
            plan.append(make_run(regime, TEACHER, TEACHER_SEED, recipe, profile, settings[TEACHER], runs_dir,
                                 data_dir))
    for seed in seeds:
        for regime in regimes:
            for method in methods:
                plan.append(make_run(regime, method, seed, recipe, profile, settings[method], runs_dir, data_dir))
    return plan


def to_argv(args: dict) -> List[str]:
    """ train.py flags from a dict: True -> bare flag, False/None -> left out, list -> nargs,
    dict -> key=value items (--model-kwargs; train.py reads each value back with literal_eval). """
    argv = []
    for key, value in args.items():
        flag = '--' + key.replace('_', '-')
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, dict):
            argv += [flag, *(f'{k}={v!r}' for k, v in value.items())]
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def command(run: Run, runs_dir: Path, resume: bool = False) -> List[str]:
    cmd = [sys.executable, 'train.py', *to_argv(run.args), '--output', str(runs_dir), '--experiment', run.name]
    if resume:
        cmd += ['--resume', str(runs_dir / run.name / 'last.pth')]
    return cmd


# ---------------------------------------------------------------- run state

def read_summary(path: Path) -> List[Dict[str, Optional[float]]]:
    """ summary.csv rows as floats; train.py leaves metrics a run does not have (eval_dt_* without a
    DT) empty, which become None. """
    with open(path, newline='') as f:
        return [{k: float(v) if v not in ('', None) else None for k, v in row.items()} for row in csv.DictReader(f)]


def is_finished(run_dir: Path, epochs: int) -> bool:
    """ All epochs in summary.csv and the student exported (train.py writes it after the last epoch). """
    summary = run_dir / 'summary.csv'
    if not summary.exists() or not (run_dir / 'student.safetensors').exists():
        return False
    return [int(r['epoch']) for r in read_summary(summary)] == list(range(epochs))


def run_state(run: Run, runs_dir: Path) -> str:
    """ 'finished', 'resume' (a checkpoint to continue from), 'stale' (a dir train.py cannot continue:
    it would create <name>-1 beside it) or 'new'. """
    run_dir = runs_dir / run.name
    if not run_dir.exists():
        return 'new'
    check_same_arguments(run, run_dir)
    if is_finished(run_dir, run.epochs):
        return 'finished'
    return 'resume' if (run_dir / 'last.pth').exists() else 'stale'


def check_same_arguments(run: Run, run_dir: Path):
    """ Refuse to skip or continue a run made with other arguments (an edited YAML or profile):
    its numbers would silently stand for a different experiment. """
    args_file = run_dir / 'args.yaml'
    if not args_file.exists():
        return
    saved = load_yaml(args_file)
    diffs = [f'{k}: {saved.get(k)!r} -> {v!r}' for k, v in run.args.items()
             if k not in ARGS_FREE_TO_CHANGE and saved.get(k) != v]
    if diffs:
        raise SystemExit(f'{run_dir} was trained with other arguments ({"; ".join(diffs)}). '
                         'Delete it or pass another --output.')


# ---------------------------------------------------------------- execution

def ensure_data(data_dir: Path):
    """ Lay out Fashion-MNIST from the Debian package when it is not there yet. """
    if (data_dir / 'FashionMNIST' / 'raw' / 'train-images-idx3-ubyte').exists():
        return
    subprocess.run(['bash', str(REPO_ROOT / 'scripts' / 'get_fashion_mnist.sh'), str(data_dir)], check=True)


def launch(run: Run, runs_dir: Path, logs_dir: Path, resume: bool) -> subprocess.Popen:
    """ train.py for this run in the background, its output appended to logs/<run>.log. """
    logs_dir.mkdir(parents=True, exist_ok=True)
    cmd = command(run, runs_dir, resume)
    with open(logs_dir / f'{run.name}.log', 'a') as log:  # a resumed run appends to its log
        log.write(f'\n$ {shlex.join(cmd)}\n')
        log.flush()
        return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)


def execute(run: Run, runs_dir: Path, logs_dir: Path, resume: bool) -> int:
    return launch(run, runs_dir, logs_dir, resume).wait()


def prune_checkpoints(run_dir: Path):
    """ A finished run needs only summary.csv and student.safetensors from here on; a GPD run's
    last.pth + model_best.pth (DT weights and momentum) take ~1.6 GB, ~35 GB over the quick profile. """
    for name in ('last.pth', 'model_best.pth'):
        (run_dir / name).unlink(missing_ok=True)


def run_plan(plan: List[Run], runs_dir: Path, logs_dir: Path, keep_checkpoints: bool = False) -> bool:
    """ Run what is not finished yet, in order; stop at the first failure (returns False), since
    failures are usually systematic and every later run would repeat them. """
    start, done = time.time(), set()
    for i, run in enumerate(plan, 1):
        state = run_state(run, runs_dir)
        prefix = f'[{i}/{len(plan)}] {run.name}'
        if state == 'finished':
            print(f'{prefix}: finished, skipped', flush=True)
            done.add(run.name)
            if not keep_checkpoints:
                prune_checkpoints(runs_dir / run.name)  # an earlier invocation stopped before pruning
            continue
        missing = [n for n in run.needs if n not in done]
        if missing:  # build_plan orders runs after their inputs; this guards that promise
            print(f'{prefix}: needs {", ".join(missing)}, which did not finish', flush=True)
            return False
        if state == 'stale':
            shutil.rmtree(runs_dir / run.name)  # killed before its first checkpoint: nothing to keep
        print(f'{prefix}: {"resuming" if state == "resume" else "training"} ...', flush=True)
        t0 = time.time()
        rc = execute(run, runs_dir, logs_dir, resume=state == 'resume')
        if rc != 0 or not is_finished(runs_dir / run.name, run.epochs):
            print(f'{prefix}: FAILED (exit {rc}), see {logs_dir / run.name}.log; '
                  'the same command continues from here', flush=True)
            return False
        done.add(run.name)
        if not keep_checkpoints:
            prune_checkpoints(runs_dir / run.name)
        top1 = read_summary(runs_dir / run.name / 'summary.csv')[-1]['eval_top1']
        print(f'{prefix}: done in {time.time() - t0:.0f} s, top-1 {top1:.2f} '
              f'(total {(time.time() - start) / 60:.1f} min)', flush=True)
    return True


def print_dry_run(plan: List[Run], runs_dir: Path):
    print(f'# in {REPO_ROOT}')
    for run in plan:
        state = run_state(run, runs_dir)
        if state == 'finished':
            print(f'# {run.name}: finished, would be skipped')
            continue
        note = {'resume': ' (resumes from last.pth)', 'stale': ' (unfinished dir without a checkpoint: '
                'would be deleted and restarted)'}.get(state, '')
        print(f'# {run.name}{note}')
        print(shlex.join(command(run, runs_dir, resume=state == 'resume')))


# ---------------------------------------------------------------- collection

@dataclass
class Result:
    regime: str
    method: str
    seed: Optional[int]
    rows: List[Dict[str, Optional[float]]]

    @property
    def top1(self) -> List[float]:
        return [r['eval_top1'] for r in self.rows]

    @property
    def dt_top1(self) -> Optional[List[float]]:
        values = [r.get('eval_dt_top1') for r in self.rows]
        return values if all(v is not None for v in values) else None

    @property
    def minutes(self) -> float:
        return sum(r['epoch_time'] for r in self.rows) / 60


def load_results(runs_dir: Path, regimes: Sequence[str]) -> Tuple[List[Result], List[str]]:
    """ Every finished run under runs_dir (whatever --only/--seeds trained it), and the names of the
    unfinished ones, which are left out of the table. """
    results, unfinished = [], []
    if not runs_dir.exists():
        return results, unfinished
    known = set(METHODS) | {TEACHER}
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        m = RUN_NAME.match(run_dir.name)
        if not m or m['regime'] not in regimes or m['method'] not in known:
            continue
        args_file = run_dir / 'args.yaml'
        epochs = load_yaml(args_file).get('epochs') if args_file.exists() else None
        if epochs is None or not is_finished(run_dir, int(epochs)):
            unfinished.append(run_dir.name)
            continue
        seed = int(m['seed']) if m['seed'] is not None else None
        results.append(Result(m['regime'], m['method'], seed, read_summary(run_dir / 'summary.csv')))
    return results, unfinished


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """ Mean and sample standard deviation (n - 1); the std is NaN for a single value. """
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def group(results: List[Result], regimes: Sequence[str]) -> List[Tuple[str, str, List[Result]]]:
    """ (regime, method, results) in table order: regimes as in the profile, teacher first. """
    groups = []
    for regime in regimes:
        for method in (TEACHER, *METHODS):
            members = [r for r in results if r.regime == regime and r.method == method]
            if members:
                groups.append((regime, method, members))
    return groups


def aggregate(results: List[Result], regimes: Sequence[str]) -> List[dict]:
    rows = []
    for regime, method, members in group(results, regimes):
        final_mean, final_std = mean_std([r.top1[-1] for r in members])
        best_mean, best_std = mean_std([max(r.top1) for r in members])
        rows.append(dict(
            regime=regime, method=method, seeds=len(members),
            final_top1_mean=final_mean, final_top1_std=final_std,
            best_top1_mean=best_mean, best_top1_std=best_std,
            train_minutes_mean=statistics.fmean(r.minutes for r in members),
        ))
    return rows


def write_csv(path: Path, rows: List[dict]):
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f'{v:.4f}' if isinstance(v, float) else v for k, v in row.items()})


def pm(mean: float, std: float) -> str:
    return f'{mean:.2f}' if math.isnan(std) else f'{mean:.2f} ± {std:.2f}'


def write_markdown(path: Path, rows: List[dict], profile_name: str):
    lines = [
        f'Student top-1 (%) on the validation subset, profile `{profile_name}`: mean ± sample std over seeds '
        '(no ± with one seed). "final" is the last epoch, "best" the best epoch of each run; '
        'train time is the sum of train.py\'s epoch times (incl. validation), per run.',
        '',
        '| regime | method | seeds | final top-1 | best top-1 | train time (min) |',
        '|---|---|---|---|---|---|',
    ]
    for r in rows:
        final, best = pm(r['final_top1_mean'], r['final_top1_std']), pm(r['best_top1_mean'], r['best_top1_std'])
        lines.append(f"| {r['regime']} | {r['method']} | {r['seeds']} | {final} | {best} "
                     f"| {r['train_minutes_mean']:.1f} |")
    path.write_text('\n'.join(lines) + '\n')


def per_run_rows(results: List[Result], regimes: Sequence[str]) -> List[dict]:
    return [dict(regime=regime, method=method, seed='' if r.seed is None else r.seed, epochs=len(r.rows),
                 final_top1=r.top1[-1], best_top1=max(r.top1),
                 final_dt_top1=r.dt_top1[-1] if r.dt_top1 else '', train_minutes=r.minutes)
            for regime, method, members in group(results, regimes) for r in members]


# the paper's claims as (better, worse) method pairs, compared seed by seed on final top-1
CLAIMS = (
    ('kd', 'baseline', 'KD > baseline'),
    ('dkd', 'kd', 'DKD > KD'),
    ('gpd_dkd', 'dkd', 'GPD + DKD > DKD (static teacher)'),
    ('gpd_scratch', 'baseline', 'GPD > baseline without a static teacher (scratch)'),
    ('finetune_gpd', 'finetune_plain', 'GPD fine-tune > plain continuation'),
    ('gpd_scratch', 'cbr_only', 'the DT adds to CBR alone'),
    ('cbr_only', 'baseline', 'CBR alone > baseline'),
    ('gpd_scratch', 'baseline_r2lr', "GPD > plain training at the GPD student's effective lr"),
)


def paired_differences(results: List[Result], regimes: Sequence[str]) -> List[dict]:
    """ For each claim and regime: final top-1 of the better-claimed method minus the other's, per
    seed both ran (the same seed: same data order and init), with mean, sample std and signs. """
    final = {(r.regime, r.method, r.seed): r.top1[-1] for r in results}
    rows = []
    for regime in regimes:
        for better, worse, claim in CLAIMS:
            seeds = sorted(s for (g, m, s) in final if g == regime and m == better and (g, worse, s) in final)
            if not seeds:
                continue
            diffs = [final[(regime, better, s)] - final[(regime, worse, s)] for s in seeds]
            mean, std = mean_std(diffs)
            rows.append(dict(regime=regime, claim=claim, better=better, worse=worse, seeds=len(seeds),
                             diff_mean=mean, diff_std=std, positive=sum(d > 0 for d in diffs),
                             per_seed=' '.join(f'{d:+.1f}' for d in diffs)))
    return rows


def write_comparisons_markdown(path: Path, rows: List[dict]):
    lines = [
        'Paired differences of final student top-1 (points): the first method minus the second, seed by seed; '
        'mean ± sample std over seeds, and in how many seeds the difference was positive.',
        '',
        '| regime | claim | difference | positive | per seed |',
        '|---|---|---|---|---|',
    ]
    for r in rows:
        lines.append(f"| {r['regime']} | {r['claim']} (`{r['better']}` - `{r['worse']}`) "
                     f"| {pm(r['diff_mean'], r['diff_std'])} | {r['positive']}/{r['seeds']} | {r['per_seed']} |")
    path.write_text('\n'.join(lines) + '\n')


# ---------------------------------------------------------------- plots

def mean_curve(series: List[List[float]]) -> Tuple[List[float], List[float]]:
    """ Per-epoch mean and std over seeds (std 0 with one seed), cut to the shortest run. """
    n = min(len(s) for s in series)
    columns = [[s[i] for s in series] for i in range(n)]
    return ([statistics.fmean(c) for c in columns],
            [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns])


def epoch_offset(results: List[Result], regime: str, setting: dict) -> int:
    """ A fine-tune continues its source run: plot its epochs after the source's. """
    source = setting.get('start_from')
    sources = [r for r in results if r.regime == regime and r.method == source]
    return len(sources[0].rows) if sources else 0


def gap_series(r: Result, setting: dict, teacher_top1: Dict[str, float]) -> Optional[Tuple[List[float], str]]:
    """ The teacher-student gap of one run: DT - student when it trained a DT, else static teacher
    (final top-1 of its own run) - student when it distilled from one, else None. """
    if r.dt_top1 is not None:
        return [d - s for d, s in zip(r.dt_top1, r.top1)], 'DT - student'
    if uses_static_teacher(setting) and r.regime in teacher_top1:
        return [teacher_top1[r.regime] - s for s in r.top1], 'static - student'
    return None


def plot_panels(path: Path, regimes: Sequence[str], ylabel: str, title: str, curves_by_regime: dict,
                hlines_by_regime: dict):
    """ One panel per regime; curves: (label, method, x, mean, std); hlines: (label, y). """
    import matplotlib
    matplotlib.use('Agg')  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = {m: plt.get_cmap('tab10')(i) for i, m in enumerate(METHODS)}
    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4.5), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        for label, method, x, mean, std in curves_by_regime.get(regime, []):
            style = '--' if method.startswith('finetune') else '-'
            ax.plot(x, mean, style, color=colors[method], label=label, marker='.')
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=colors[method], alpha=0.15, linewidth=0)
        for label, y in hlines_by_regime.get(regime, []):
            ax.axhline(y, color='gray', linestyle=':', label=label)
        ax.set_title(f'{title}: {regime}')
        ax.set_xlabel('epochs trained')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(out_dir: Path, results: List[Result], regimes: Sequence[str], settings: Dict[str, dict]):
    teacher_top1 = {r.regime: r.top1[-1] for r in results if r.method == TEACHER}
    top1_curves, gap_curves, hlines = {}, {}, {}
    for regime, method, members in group(results, regimes):
        if method == TEACHER:
            hlines[regime] = [(f'static teacher (final) {teacher_top1[regime]:.1f}', teacher_top1[regime])]
            continue
        offset = epoch_offset(results, regime, settings[method])
        mean, std = mean_curve([r.top1 for r in members])
        x = list(range(offset + 1, offset + len(mean) + 1))
        top1_curves.setdefault(regime, []).append((f'{method} (n={len(members)})', method, x, mean, std))
        gaps = [gap_series(r, settings[method], teacher_top1) for r in members]
        if all(g is not None for g in gaps):
            mean, std = mean_curve([g[0] for g in gaps])
            gap_curves.setdefault(regime, []).append((f'{method}: {gaps[0][1]}', method, x[:len(mean)], mean, std))
    plot_panels(out_dir / 'top1_per_epoch.png', regimes, 'student top-1 (%)', 'student top-1, mean over seeds',
                top1_curves, hlines)
    plot_panels(out_dir / 'gap_per_epoch.png', regimes, 'top-1 gap (points)', 'teacher - student gap',
                gap_curves, {r: [('no gap', 0.0)] for r in regimes})


def collect(out_dir: Path, profile_name: str, regimes: Sequence[str]) -> bool:
    """ Tables and plots from every finished run in out_dir/runs; False when there is none. """
    results, unfinished = load_results(out_dir / 'runs', regimes)
    if unfinished:
        print(f'left out (unfinished): {", ".join(unfinished)}')
    if not results:
        print(f'no finished runs under {out_dir / "runs"}')
        return False
    rows = aggregate(results, regimes)
    write_csv(out_dir / 'accuracy.csv', rows)
    write_csv(out_dir / 'runs.csv', per_run_rows(results, regimes))
    write_markdown(out_dir / 'accuracy.md', rows, profile_name)
    written = ['accuracy.csv', 'accuracy.md', 'runs.csv']
    comparisons = paired_differences(results, regimes)
    if comparisons:
        write_csv(out_dir / 'comparisons.csv', comparisons)
        write_comparisons_markdown(out_dir / 'comparisons.md', comparisons)
        written += ['comparisons.csv', 'comparisons.md']
    write_plots(out_dir, results, regimes, load_settings())
    written += ['top1_per_epoch.png', 'gap_per_epoch.png']
    print((out_dir / 'accuracy.md').read_text())
    if comparisons:
        print((out_dir / 'comparisons.md').read_text())
    print(f'written: {", ".join(written)} in {out_dir}')
    return True


# ---------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument('--quick', dest='profile', action='store_const', const='quick',
                       help='CPU smoke profile (benchmarks/configs/profile_quick.yaml)')
    which.add_argument('--full', dest='profile', action='store_const', const='full',
                       help='GPU profile (benchmarks/configs/profile_full.yaml)')
    p.add_argument('--only', nargs='+', choices=METHODS, metavar='METHOD',
                   help=f'train only these methods (and the runs they start from): {", ".join(METHODS)}')
    p.add_argument('--seeds', nargs='+', type=int, metavar='S', help="default: the profile's seeds")
    p.add_argument('--regimes', nargs='+', metavar='REGIME', help="default: the profile's regimes (full, low)")
    p.add_argument('--epochs-scale', type=int, default=1, metavar='K',
                   help="train K times the profile's epochs (a longer run of the same recipe; use another --output)")
    p.add_argument('--output', type=Path, help='default: benchmarks/results/<profile>')
    p.add_argument('--data-dir', type=Path, default=REPO_ROOT / 'data',
                   help='Fashion-MNIST root (laid out from the Debian package when missing)')
    p.add_argument('--keep-checkpoints', action='store_true',
                   help="keep finished runs' last.pth / model_best.pth (default: deleted, ~1.6 GB per GPD run)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument('--dry-run', action='store_true', help='print the train.py commands, run nothing')
    mode.add_argument('--collect-only', action='store_true',
                      help='only rebuild tables and plots from the finished runs (ignores --only/--seeds)')
    args = p.parse_args(argv)
    # absolute: the paths end up in train.py commands that run with the repository as cwd
    args.output = (args.output or REPO_ROOT / 'benchmarks' / 'results' / args.profile).resolve()
    args.data_dir = args.data_dir.resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    profile = load_yaml(CONFIG_DIR / f'profile_{args.profile}.yaml')
    if args.regimes:
        unknown = sorted(set(args.regimes) - set(profile['regimes']))
        if unknown:
            raise SystemExit(f'unknown regime(s) {", ".join(unknown)}: profile {args.profile} has '
                             f'{", ".join(profile["regimes"])}')
        profile['regimes'] = {r: profile['regimes'][r] for r in args.regimes}
    if args.epochs_scale < 1:
        raise SystemExit(f'--epochs-scale must be >= 1, got {args.epochs_scale}')
    for sizes in profile['regimes'].values():
        sizes['epochs'] *= args.epochs_scale
        sizes['finetune_epochs'] *= args.epochs_scale
    regimes = list(profile['regimes'])
    runs_dir = args.output / 'runs'
    if args.collect_only:
        return 0 if collect(args.output, args.profile, regimes) else 1

    plan = build_plan(profile, args.only or METHODS, args.seeds or profile['seeds'], runs_dir, args.data_dir)
    if args.dry_run:
        print_dry_run(plan, runs_dir)
        return 0
    ensure_data(args.data_dir)
    args.output.mkdir(parents=True, exist_ok=True)
    ignore = args.output / '.gitignore'
    if not ignore.exists():  # the tables and plots are for committing, the run folders are not
        ignore.write_text('runs/\nlogs/\n')
    ok = run_plan(plan, runs_dir, args.output / 'logs', args.keep_checkpoints)
    collect(args.output, args.profile, regimes)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
