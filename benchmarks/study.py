"""Does GPD train better students? A converged, controlled study on the full Fashion-MNIST.

Drives train.py (one subprocess per run, each resumable) through the study described by
benchmarks/configs/study_fmnist.yaml, stage by stage (`stages`: the study's main questions first,
so that it can stop after any stage; without it, one stage of everything). In each stage:

  1. the static teachers its methods read, trained once on the same split
  2. the lr sweep: every swept method at every lr of the grid, seed 0; each method's lr is the
     one with the best final *validation* top-1 (a choice at the grid's edge adds the next value
     beyond it, once)
  3. seeds: every method at its chosen lr, seed by seed, up to the stage's cap; methods whose lr
     follows another's choice (`derived`: GPD + DKD, GPD without CBR, the decoupled student, the
     r**2-lr baseline) and the fine-tune pair (from the converged baseline of the same seed) join
     here

Validation is the held-out tail of the training split (train.py --val-holdout); the test split is
evaluated every epoch and never read by any choice. Then it collects every finished run into
runs.csv (one row per run), study.md (the sweep, per-method mean +- std, paired differences
with 95 % confidence intervals, convergence and DT - student gap) and three plots.

    python benchmarks/study.py                      # run what is missing, in order (started runs resume first)
    python benchmarks/study.py --max-hours 2        # start no new run after 2 hours
    python benchmarks/study.py --commit             # git-commit each finished run's results
    python benchmarks/study.py --jobs 6 --finish-within 0.15   # a GPU: 6 runs side by side, only
                                                    # runs whose estimate ends within 9 minutes
    python benchmarks/study.py --dry-run            # the plan: what is finished, next, blocked
    python benchmarks/study.py --collect-only       # rebuild tables and plots from finished runs
    python benchmarks/study.py --publish-best DIR   # each student's best GPD run, as hfhub.publish --dry-run

Output (default benchmarks/results/study_fmnist/): runs/<name>/ holds train.py's output; the
summary, arguments and study.json (processors, commits) of finished runs are committed, the
weights are not (.gitignore): a finished run keeps final.pth (its last checkpoint without the
optimizer state, publishable with hfhub.publish) and student.safetensors.
"""
import argparse
import csv
import fcntl
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's timm_gpd, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402  (the run plumbing: argv, resume state, execution)
from accuracy import REPO_ROOT, CONFIG_DIR, Run, load_yaml, mean_std, pm, read_summary  # noqa: E402
from timm_gpd.models._builder import HUB_ORG  # noqa: E402  (where the gpd_*.fmnist tags point)

STUDY_CONFIG = CONFIG_DIR / 'study_fmnist.yaml'
FINETUNES = ('finetune_plain', 'finetune_gpd')
TRAIN_IMAGES = 60000  # Fashion-MNIST's training split
# two-sided 95 % quantiles of Student's t, by degrees of freedom (1-10)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
# the paper's claims (and the controls') as (first, second): paired test top-1 differences
CLAIMS = (
    ('kd', 'baseline', 'KD > baseline'),
    ('dkd', 'baseline', 'DKD > baseline'),
    ('gpd_dkd', 'dkd', 'GPD + DKD > DKD (static teacher)'),
    ('gpd_scratch', 'baseline', 'GPD > baseline (no static teacher)'),
    ('finetune_gpd', 'finetune_plain', 'GPD fine-tune > plain continuation'),
    ('gpd_scratch', 'gpd_nocbr', 'CBR adds to GPD'),
    ('gpd_scratch', 'cbr_only', 'the DT adds to CBR alone'),
    ('cbr_only', 'baseline', 'CBR alone > baseline'),
    ('gpd_scratch', 'baseline_r2lr', "GPD > the baseline at the GPD student's effective lr"),
    ('gpd_decoupled', 'gpd_scratch', 'decoupled student > published GPD'),
    ('wide_baseline', 'baseline', "the DT's width alone > the student (the headroom a DT could lead by)"),
)


# ---------------------------------------------------------------- plan

@dataclass(frozen=True)
class Blocked:
    name: str
    reason: str


def settings_of(method: str) -> dict:
    return load_yaml(CONFIG_DIR / f'{method}.yaml')


def lr_tag(lr: float) -> str:
    return f'{lr:g}'


def run_name(student: str, method: str, lr: float, seed: int) -> str:
    return f'{student}-{method}-lr{lr_tag(lr)}-s{seed}'


def teacher_name(arch: str) -> str:
    return f'teacher-{arch}'


def seeds_of(study: dict, method: str) -> int:
    return study['headline_seeds'] if method in study['headline'] else study['seeds']


def swept(study: dict, student: str) -> List[str]:
    methods = study['students'][student]['methods']
    return [m for m in methods if m not in study.get('derived', {}) and m not in FINETUNES]


class Planner:
    """ The study's runs given what has finished so far: the sweep decides the later runs' lr. """

    def __init__(self, study: dict, runs_dir: Path, data_dir: Path):
        self.study, self.runs_dir, self.data_dir = study, runs_dir, data_dir
        self.recipe = load_yaml(CONFIG_DIR / 'recipe.yaml')

    def base_args(self, student: str, seed: int) -> dict:
        args = {**self.recipe, **self.study['train'], 'model': student, 'seed': seed,
                'data_dir': str(self.data_dir)}
        return args

    def teacher_run(self, arch: str) -> Run:
        args = {**self.base_args(arch, 0), **self.study['teacher']}
        return Run(teacher_name(arch), arch, 'teacher', 0, args)

    def method_run(self, student: str, method: str, lr: float, seed: int, wd: Optional[float] = None,
                   start: Optional[Run] = None) -> Run:
        setting = settings_of(method).get('train', {})
        lr = float(f'{lr:.6g}')  # 0.005, not 0.005000000000000001 from 0.05 x 0.1
        args = {**self.base_args(student, seed), **setting, 'lr': lr}
        if wd is not None:
            args['weight_decay'] = wd
        needs = []
        if args.get('teacher'):
            arch = self.study['students'][student]['teacher']
            args['teacher'] = arch
            args['teacher_checkpoint'] = str(self.runs_dir / teacher_name(arch) / 'student.safetensors')
            needs.append(teacher_name(arch))
        if args.get('gpd'):
            args['gpd_seed'] = seed  # the CBR init and the DT's noise vary with the seed too
        if start is not None:
            ft = self.study['finetune']
            args.update(epochs=ft['epochs'], warmup_epochs=ft['warmup_epochs'],
                        initial_checkpoint=str(self.runs_dir / start.name / 'student.safetensors'))
            needs.append(start.name)
        return Run(run_name(student, method, lr, seed), student, method, seed, args, tuple(needs))

    def final_val(self, run: Run) -> Optional[float]:
        run_dir = self.runs_dir / run.name
        if not completed(run_dir, run.epochs):
            return None
        return read_summary(run_dir / 'summary.csv')[-1]['eval_top1']

    def sweep(self, student: str, method: str) -> Tuple[List[Run], Optional[float]]:
        """ The sweep's runs (growing at an edge) and the chosen lr once they have all finished. """
        grid = sorted(self.study['lrs'])
        while True:
            runs = [self.method_run(student, method, lr, 0) for lr in grid]
            vals = [self.final_val(r) for r in runs]
            if any(v is None for v in vals):
                return runs, None
            best = max(range(len(grid)), key=lambda i: (vals[i], -i))  # a tie: the smaller lr
            at_low, at_high = best == 0, best == len(grid) - 1
            extended = len(grid) > len(self.study['lrs'])
            if self.study.get('extend_edges') and not extended and (at_low or at_high):
                grid = [grid[0] / 2] + grid if at_low else grid + [grid[-1] * 2]
                continue
            return runs, grid[best]

    def chosen_lr(self, student: str, method: str) -> Optional[float]:
        return self.sweep(student, method)[1]

    def stages(self) -> List[dict]:
        """ The order runs are taken in: `stages` in the study YAML, each {methods, optional
        students, optional seeds cap}; without it one stage of everything. Every (student, method)
        must be in a stage: a study that silently skips a method would report without it. """
        study = self.study
        stages = study.get('stages') or [{'methods': sorted({m for s in study['students'].values()
                                                             for m in s['methods']})}]
        covered = set()
        for i, stage in enumerate(stages):
            for student in stage.get('students', study['students']):
                if student not in study['students']:
                    raise ValueError(f'stage {i + 1}: student {student!r} is not in the study')
                known = study['students'][student]['methods']
                for method in stage['methods']:
                    if method in known:
                        covered.add((student, method))
            unknown = [m for m in stage['methods'] if not any(m in s['methods'] for s in study['students'].values())]
            if unknown:
                raise ValueError(f'stage {i + 1}: {", ".join(unknown)} not a method of any student')
        missing = [f'{st}:{m}' for st, spec in study['students'].items() for m in spec['methods']
                   if (st, m) not in covered]
        if missing:
            raise ValueError(f'in no stage: {", ".join(missing)}')
        return stages

    def plan(self) -> List[object]:
        """ Every run in order, or a Blocked entry for runs whose lr is not chosen yet. """
        return [item for _, item in self.staged_plan()]

    def staged_plan(self) -> List[Tuple[int, object]]:
        """ (stage number from 1, run or Blocked) in order: stage by stage, the stage's static
        teachers, its sweeps, then its seeds. """
        plan: List[Tuple[int, object]] = []
        study = self.study
        chosen = {(student, method): self.chosen_lr(student, method)
                  for student in study['students'] for method in swept(study, student)}
        for number, stage in enumerate(self.stages(), 1):
            members = [(student, method) for student in stage.get('students', study['students'])
                       for method in study['students'][student]['methods'] if method in stage['methods']]
            items: List[object] = []
            for student, method in members:
                if settings_of(method).get('train', {}).get('teacher'):
                    items.append(self.teacher_run(study['students'][student]['teacher']))
            for student, method in members:
                if method in swept(study, student):
                    items += self.sweep(student, method)[0]
            cap = stage.get('seeds', max(study['seeds'], study['headline_seeds']))
            for seed in range(cap):
                for student, method in members:
                    if seed == 0 and method in swept(study, student):
                        continue  # its sweep run at the chosen lr
                    if seed < seeds_of(study, method):
                        items.append(self.seed_run(student, method, seed, chosen))
            plan += [(number, item) for item in items]
        # a teacher serves every stage, a later stage repeats an earlier one's seeds: listed once
        seen, ordered = set(), []
        for number, item in plan:
            if item.name not in seen:
                seen.add(item.name)
                ordered.append((number, item))
        return ordered

    def seed_run(self, student: str, method: str, seed: int, chosen: dict):
        derived = self.study.get('derived', {})
        if method in FINETUNES:
            lr = chosen.get((student, 'baseline'))
            if lr is None:
                return Blocked(f'{student}-{method}-s{seed}', 'waits for the baseline sweep')
            start = self.method_run(student, 'baseline', lr, seed)
            return self.method_run(student, method, lr * self.study['finetune']['lr_scale'], seed, start=start)
        if method in derived:
            spec = derived[method]
            lr = chosen.get((student, spec['lr_from']))
            if lr is None:
                return Blocked(f'{student}-{method}-s{seed}', f'waits for the {spec["lr_from"]} sweep')
            wd = None
            if 'wd_scale' in spec:
                wd = float(f"{self.base_args(student, seed)['weight_decay'] * spec['wd_scale']:.6g}")
            return self.method_run(student, method, lr * spec.get('lr_scale', 1.0), seed, wd=wd)
        lr = chosen.get((student, method))
        if lr is None:
            return Blocked(f'{student}-{method}-s{seed}', 'waits for its sweep')
        return self.method_run(student, method, lr, seed)


# ---------------------------------------------------------------- execution

def processor() -> str:
    """ The GPU that trains the runs where there is one, else the CPU's model name. """
    import torch
    from timm_gpd.checkpoint import processor_name
    return torch.cuda.get_device_name() if torch.cuda.is_available() else processor_name()


def git_commit() -> str:
    """ $GPD_STUDY_COMMIT where set: the commit a copied tree was made from (a remote GPU machine's
    copy may carry no .git, or a stale one); else HEAD (+dirty). """
    if os.environ.get('GPD_STUDY_COMMIT'):
        return os.environ['GPD_STUDY_COMMIT']
    try:
        head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ('+dirty' if dirty else '')
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def read_info(run_dir: Path) -> dict:
    path = run_dir / 'study.json'
    return json.loads(path.read_text()) if path.exists() else {'processors': [], 'commits': []}


def record_session(run_dir: Path, finished: bool = False):
    """ study.json: every processor and commit that trained part of this run (a resumed run may
    continue on another machine: single runs do not reproduce across processors), and whether its
    results were collected. """
    path = run_dir / 'study.json'
    info = read_info(run_dir)
    for key, value in (('processors', processor()), ('commits', git_commit())):
        if value not in info[key]:
            info[key].append(value)
    if finished:
        info['finished'] = True
    tmp = path.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(info, indent=1) + '\n')
    os.replace(tmp, path)


def committed_files(run_dir: Path) -> List[Path]:
    return [run_dir / f for f in ('summary.csv', 'args.yaml', 'study.json', 'config.json') if (run_dir / f).exists()]


def repository_of(folder: Path) -> Optional[Path]:
    """ The top folder of the git repository that holds `folder` (None outside one). """
    top = subprocess.run(['git', 'rev-parse', '--show-toplevel'], cwd=folder, capture_output=True, text=True)
    return Path(top.stdout.strip()) if top.returncode == 0 else None


def git_commit_paths(paths: Sequence[Path], message: str):
    """ Commit exactly these paths in the repository that holds them (others' staged changes stay
    staged), retrying a busy index. """
    repo = repository_of(paths[0].parent)
    if repo is None:
        print(f'not committed: {paths[0].parent} is not in a git repository', flush=True)
        return
    rel = [str(p.resolve().relative_to(repo.resolve())) for p in paths]
    for attempt in range(10):
        add = subprocess.run(['git', 'add', '--', *rel], cwd=repo, capture_output=True, text=True)
        if add.returncode == 0:
            commit = subprocess.run(['git', 'commit', '-q', '-m', message, '--', *rel], cwd=repo,
                                    capture_output=True, text=True)
            if commit.returncode == 0 or 'nothing' in commit.stdout + commit.stderr:
                return
            err = commit.stderr
        else:
            err = add.stderr
        if 'index.lock' not in err:
            print(f'git commit failed: {err.strip()}', flush=True)
            return
        time.sleep(3 + attempt)
    print('git commit failed: the index stayed locked', flush=True)


def completed(run_dir: Path, epochs: int) -> bool:
    """ Every epoch in summary.csv (a clone of the repository has the committed summaries of
    finished runs, not their weights). """
    summary = run_dir / 'summary.csv'
    return summary.exists() and [int(r['epoch']) for r in read_summary(summary)] == list(range(epochs))


def state_of(run: Run, runs_dir: Path) -> str:
    """ 'finished', 'resume' (a checkpoint to continue from), 'stale' (started, no checkpoint yet:
    restarted from scratch) or 'new'; refuses a folder trained with other arguments. """
    run_dir = runs_dir / run.name
    if not run_dir.exists():
        return 'new'
    accuracy.check_same_arguments(run, run_dir)
    if completed(run_dir, run.epochs):
        return 'finished'
    return 'resume' if (run_dir / 'last.pth').exists() else 'stale'


FINAL_CHECKPOINT = 'final.pth'
CARD_NOTES = 'card_notes.md'  # --card-notes of hfhub.publish for the study's best GPD student
RESUME_ONLY_KEYS = ('optimizer', 'scheduler', 'rng', 'scaler')  # train.py's checkpoint keys only a resume reads


def keep_final_checkpoint(run_dir: Path):
    """ final.pth: last.pth without what only resuming needs (optimizer, scheduler, RNG states): a
    GPD run's ~1.6 GB of checkpoints become its DT's ~0.2 GB, and the run stays publishable
    (``python -m hfhub.publish --checkpoint runs/<run>/final.pth``) and rebuildable by validate.py. """
    from timm_gpd.checkpoint import CheckpointError, load_checkpoint, save_atomic
    last = run_dir / 'last.pth'
    if not last.exists():
        return
    try:
        checkpoint = load_checkpoint(last)
    except CheckpointError as e:  # the run's results stand; only its weights are lost
        print(f'{run_dir.name}: no {FINAL_CHECKPOINT} kept: {e}', flush=True)
        return
    for key in RESUME_ONLY_KEYS:
        checkpoint.pop(key, None)
    save_atomic(checkpoint, run_dir / FINAL_CHECKPOINT)


def finalize(run: Run, out_dir: Path, planner: Planner, commit: bool):
    """ A finished run: its final weights kept (final.pth, and the student: teachers and fine-tune
    starts are read by later runs), the other checkpoints pruned, study.json marked, tables
    rebuilt and, with --commit, committed. """
    run_dir = planner.runs_dir / run.name
    keep_final_checkpoint(run_dir)
    accuracy.prune_checkpoints(run_dir)
    record_session(run_dir, finished=True)
    rows = read_summary(run_dir / 'summary.csv')
    row = rows[-1]
    print(f'{run.name}: finished, val top-1 {row["eval_top1"]:.2f}, test top-1 '
          f'{row.get("test_top1") or float("nan"):.2f}, {sum(r["epoch_time"] for r in rows) / 60:.1f} min', flush=True)
    written = collect(out_dir, planner, quiet=True)
    if commit:
        git_commit_paths(committed_files(run_dir) + written, f'study: {run.name} finished (val top-1 {row["eval_top1"]:.2f})')


def run_study(planner: Planner, out_dir: Path, max_hours: Optional[float], commit: bool,
              only: Optional[Sequence[str]], jobs: int = 1, finish_within: Optional[float] = None,
              poll_seconds: float = 5.0) -> bool:
    """ Train the runnable unfinished runs (those with a checkpoint first, then in plan order), up
    to `jobs` side by side, until none is left (True) or one fails (False: no new run starts, the
    running ones finish). `max_hours`: no run starts after it; `finish_within`: a run starts only
    if its estimate (--dry-run's) ends within that many hours of the start. """
    runs_dir, logs_dir = planner.runs_dir, out_dir / 'logs'
    start = time.time()
    running: Dict[str, Tuple[Run, subprocess.Popen]] = {}
    failed = False
    while True:
        for name, (run, proc) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if (runs_dir / name).is_dir():
                record_session(runs_dir / name)
            if proc.returncode != 0 or not completed(runs_dir / name, run.epochs):
                print(f'{name}: FAILED (exit {proc.returncode}), see {logs_dir / name}.log', flush=True)
                failed = True
            else:
                finalize(run, out_dir, planner, commit)
        if failed:  # failures are usually systematic: every later run would repeat them
            if not running:
                return False
            time.sleep(poll_seconds)
            continue
        todo = [r for r in planner.plan() if isinstance(r, Run)]
        if only:  # the chosen methods or runs and the runs they read (teacher, fine-tune start)
            wanted = {r.name for r in todo if r.method in only or r.name in only}
            wanted |= {n for r in todo if r.name in wanted for n in r.needs}
            todo = [r for r in todo if r.name in wanted]
        states = {r.name: 'running' if r.name in running else state_of(r, runs_dir) for r in todo}
        for r in todo:  # finished while no driver watched (killed driver, earlier session)
            if states[r.name] == 'finished' and not read_info(runs_dir / r.name).get('finished'):
                finalize(r, out_dir, planner, commit)
        pending = [r for r in todo if states[r.name] != 'finished']
        missing_weights = {n for r in pending for n in r.needs
                           if states.get(n) == 'finished' and not (runs_dir / n / 'student.safetensors').exists()}
        runnable = [r for r in pending if r.name not in running and all(
            states.get(n) == 'finished' and n not in missing_weights for n in r.needs)]
        # a run with a checkpoint goes first: its epochs so far are spent, and a restarted driver
        # should not leave it half-trained behind new runs (otherwise plan order)
        runnable.sort(key=lambda r: states[r.name] != 'resume')
        if not runnable and not running:
            if missing_weights:
                print(f'the weights of {", ".join(sorted(missing_weights))} are not on this machine (only its '
                      'summary is committed): delete its folder under runs/ to train it again', flush=True)
            if pending:
                print(f'{len(pending)} run(s) left, none runnable: {", ".join(r.name for r in pending[:5])}')
            return not pending
        hours = (time.time() - start) / 3600
        if max_hours is not None and hours > max_hours:
            runnable = []
            if not running:
                print(f'--max-hours {max_hours} reached: {len(pending)} run(s) left, the same command continues')
                return True
        if finish_within is not None and len(running) < jobs:  # estimates read every summary: only with a free slot
            runnable = fitting(planner, runnable, states, finish_within - hours)
            if not runnable and not running:
                print(f'--finish-within {finish_within}: no run left fits ({len(pending)} left), '
                      'the same command continues')
                return True
        for run in runnable[:max(0, jobs - len(running))]:
            state = states[run.name]
            if state == 'stale':
                shutil.rmtree(runs_dir / run.name)
            print(f'{run.name}: {"resuming" if state == "resume" else "training"} ({len(pending)} left) ...',
                  flush=True)
            if state == 'resume':  # a new run's folder is train.py's to create (an existing one gets a suffix)
                record_session(runs_dir / run.name)
            running[run.name] = (run, accuracy.launch(run, runs_dir, logs_dir, resume=state == 'resume'))
        time.sleep(poll_seconds if running else 0)


def run_minutes(planner: Planner, run: Run, state: str, costs: Dict[Tuple[str, str], float]) -> Optional[float]:
    """ The minutes a run should take from here: its method's minutes per epoch x the epochs it has
    left (a resumed run continues), None without an estimate. """
    guess = costs.get((run.regime, run.method))
    if guess is None:
        return None
    summary = planner.runs_dir / run.name / 'summary.csv'
    done = len(read_summary(summary)) if state == 'resume' and summary.exists() else 0
    return guess * (run.epochs - done)


def fitting(planner: Planner, runs: List[Run], states: Dict[str, str], hours_left: float) -> List[Run]:
    """ The runs whose estimate ends within `hours_left` (a run without an estimate does not). """
    costs = epoch_minutes(planner, finished_results(planner))
    fits = []
    for run in runs:
        minutes = run_minutes(planner, run, states[run.name], costs)
        if minutes is not None and minutes <= hours_left * 60:
            fits.append(run)
    return fits


# ---------------------------------------------------------------- collection

@dataclass
class Result:
    run: Run
    stage: str
    rows: List[Dict[str, Optional[float]]]
    info: dict

    def column(self, key: str) -> List[Optional[float]]:
        return [r.get(key) for r in self.rows]

    @property
    def final(self) -> Dict[str, Optional[float]]:
        return self.rows[-1]

    @property
    def minutes(self) -> float:
        return sum(r['epoch_time'] for r in self.rows) / 60


def finished_results(planner: Planner) -> List[Result]:
    """ Every planned run whose summary has all its epochs (weights need not be on this machine:
    a clone of the repository has the committed summaries only). """
    results = []
    for item in planner.plan():
        if not isinstance(item, Run):
            continue
        run_dir = planner.runs_dir / item.name
        summary = run_dir / 'summary.csv'
        if not summary.exists():
            continue
        rows = read_summary(summary)
        if [int(r['epoch']) for r in rows] != list(range(item.epochs)):
            continue
        info = json.loads((run_dir / 'study.json').read_text()) if (run_dir / 'study.json').exists() else {}
        stage = 'teacher' if item.method == 'teacher' else 'sweep' if item.seed == 0 and item.method in \
            swept(planner.study, item.regime) else 'seed'
        results.append(Result(item, stage, rows, info))
    return results


def chosen_runs(planner: Planner, results: List[Result]) -> Dict[Tuple[str, str], List[Result]]:
    """ (student, method) -> the finished runs at the method's chosen lr (all seeds). """
    out: Dict[Tuple[str, str], List[Result]] = {}
    for r in results:
        if r.run.method == 'teacher':
            continue
        student, method = r.run.regime, r.run.method
        if method in swept(planner.study, student):
            lr = planner.chosen_lr(student, method)
            if lr is None or r.run.args['lr'] != lr:
                continue
        out.setdefault((student, method), []).append(r)
    return out


def runs_rows(planner: Planner, results: List[Result]) -> List[dict]:
    chosen = chosen_runs(planner, results)
    chosen_names = {r.run.name for rs in chosen.values() for r in rs}
    rows = []
    for r in results:
        a, f = r.run.args, r.final
        images = (a.get('train_limit') or TRAIN_IMAGES - a.get('val_holdout', 0))
        rows.append(dict(
            student=r.run.regime, method=r.run.method, stage=r.stage, selected=r.run.name in chosen_names,
            teacher=a.get('teacher') or '', seed=r.run.seed, lr=f"{a['lr']:g}", wd=f"{a['weight_decay']:g}",
            epochs=r.run.epochs,
            images=images, val_top1=f['eval_top1'], test_top1=f.get('test_top1'),
            val_gain_last_fifth=_round(last_fifth_gain(r.column('eval_top1'))),
            dt_test_top1=f.get('test_dt_top1') if f.get('test_dt_top1') is not None else '',
            wall_minutes=round(r.minutes, 2), processor='; '.join(r.info.get('processors', [])),
            git_commit='; '.join(r.info.get('commits', [])), run=r.run.name,
        ))
    return rows


def _round(value: Optional[float], digits: int = 4):
    return '' if value is None else round(value, digits)


def ci95(diffs: Sequence[float]) -> Tuple[float, float, float]:
    """ Mean and the 95 % confidence interval of the mean (Student's t); NaN bounds for n < 2. """
    mean, std = mean_std(diffs)
    n = len(diffs)
    if n < 2:
        return mean, math.nan, math.nan
    half = T975.get(n - 1, 1.96) * std / math.sqrt(n)
    return mean, mean - half, mean + half


def comparisons(planner: Planner, results: List[Result]) -> List[dict]:
    chosen = chosen_runs(planner, results)
    rows = []
    for student in planner.study['students']:
        for first, second, claim in CLAIMS:
            a = {r.run.seed: r.final['test_top1'] for r in chosen.get((student, first), [])}
            b = {r.run.seed: r.final['test_top1'] for r in chosen.get((student, second), [])}
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            diffs = [a[s] - b[s] for s in seeds]
            mean, low, high = ci95(diffs)
            rows.append(dict(student=student, claim=claim, first=first, second=second, seeds=len(seeds),
                             diff_mean=mean, ci_low=low, ci_high=high, positive=sum(d > 0 for d in diffs),
                             per_seed=' '.join(f'{d:+.2f}' for d in diffs)))
    return rows


def fmt_ci(row: dict) -> str:
    if math.isnan(row['ci_low']):
        return f"{row['diff_mean']:+.2f}"
    return f"{row['diff_mean']:+.2f} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"


def last_fifth_gain(values: List[float]) -> Optional[float]:
    """ Gain of a per-epoch curve over the last fifth of training: values[i] is measured after
    i + 1 epochs, the value at 4/5 of the epochs interpolated linearly between its neighbours. """
    n = len(values)
    if n < 2:
        return None
    at = 0.8 * n - 1  # position of 4/5 of training in the values' index
    if at < 0:
        return None
    low = int(at)
    start = values[low] + (at - low) * (values[min(low + 1, n - 1)] - values[low])
    return values[-1] - start


def study_markdown(planner: Planner, results: List[Result]) -> str:
    study = planner.study
    chosen = chosen_runs(planner, results)
    lines = ['# Study: does GPD train better students? (Fashion-MNIST)', '',
             'Generated by `python benchmarks/study.py --collect-only` from `runs.csv`\'s runs. '
             f"Validation: the last {study['train'].get('val_holdout', 0):,} training images; test: the test "
             'split (never used for a choice). Top-1 in %, final epoch; mean ± sample std over seeds; differences are paired '
             'by seed with a 95 % t confidence interval.', '']
    teachers = [r for r in results if r.run.method == 'teacher']
    if teachers:
        lines += ['## Static teachers', '', '| teacher | epochs | val top-1 | test top-1 | minutes |', '|---|---|---|---|---|']
        lines += [f"| {r.run.regime} | {r.run.epochs} | {r.final['eval_top1']:.2f} | {r.final['test_top1']:.2f} "
                  f"| {r.minutes:.1f} |" for r in teachers]
        lines.append('')
    lines += ['## lr sweep (seed 0, final validation top-1; **bold**: chosen)', '']
    for student in study['students']:
        for method in swept(study, student):
            runs, lr = planner.sweep(student, method)
            cells = []
            for run in runs:
                val = planner.final_val(run)
                if val is None:
                    found = [r for r in results if r.run.name == run.name]
                    val = found[0].final['eval_top1'] if found else None
                text = f'{lr_tag(run.args["lr"])}: ' + ('...' if val is None else f'{val:.2f}')
                cells.append(f'**{text}**' if lr is not None and run.args['lr'] == lr else text)
            lines.append(f'- {student} {method}: ' + ', '.join(cells))
    lines += ['', '## Per method, at its chosen lr', ''] + method_table(chosen)
    comps = comparisons(planner, results)
    if comps:
        lines += ['', '## Paired differences (test top-1, points)', ''] + comparison_table(comps)
    best = best_gpd_runs(planner, results)
    if best:
        lines += ['', '## Best GPD student per student architecture (by validation top-1)', '']
        lines += [f"- {r.run.regime}: `{r.run.name}`, val {r.final['eval_top1']:.2f}, test {r.final['test_top1']:.2f}"
                  f" (publish: {publish_command(planner, r)})" for r in best]
    lines += ['', '## Convergence (validation top-1 gained over the last fifth of training, every run)', '']
    gain_of = {r.run.name: last_fifth_gain(r.column('eval_top1')) for r in results}
    for r in results:
        gain = gain_of[r.run.name]
        if gain is not None:
            lines.append(f'- {r.run.name}: {gain:+.2f} ({r.run.epochs} epochs)')
    for (student, method), members in chosen.items():
        # one run's gain is two readings of a 5,000-image split apart: the seeds' mean is what to judge
        gains = [gain_of[r.run.name] for r in members if gain_of[r.run.name] is not None]
        if len(gains) > 1:
            lines.append(f"- {student} {method} at lr {members[0].run.args['lr']:g}, mean of {len(gains)} "
                         f'seeds: {statistics.fmean(gains):+.2f}')
    gap_lines = []
    for (student, method), members in chosen.items():
        gaps = [r.column('test_gap_top1') for r in members]
        if gaps and all(g and all(v is not None for v in g) for g in gaps):
            mean_gap = [statistics.fmean(c) for c in zip(*gaps)]
            gap_lines.append(f'- {student} {method}: ' + ' '.join(f'{g:+.2f}' for g in mean_gap))
    if gap_lines:
        lines += ['', '## DT - student gap per epoch (test top-1, mean over seeds)', ''] + gap_lines
    lines += failed_students(planner, results)
    return '\n'.join(lines) + '\n'


FAILED_STUDENT_GAP = 5.0  # test top-1 points a student may end behind its own DT before it counts as
                          # failed (the study YAML's `failed_student_gap` overrides it)
CHANCE_TOP1 = 15.0        # top-1 (%) under which a 10-class student is near chance (10 %)


def gpd_results(results: List[Result]) -> List[Result]:
    return [r for r in results if r.run.args.get('gpd') and r.final.get('test_dt_top1') is not None]


def failed_gap(planner: Planner) -> float:
    return float(planner.study.get('failed_student_gap', FAILED_STUDENT_GAP))


def failed_runs(planner: Planner, results: List[Result]) -> List[Result]:
    """ GPD runs (any lr, any seed) whose student ended more than `failed_gap` test points
    behind its own DT. """
    gap = failed_gap(planner)
    return [r for r in gpd_results(results) if r.final['test_dt_top1'] - r.final['test_top1'] > gap]


def failed_students(planner: Planner, results: List[Result]) -> List[str]:
    """ study.md's section on the failed students: the DT then "leads" because its student
    failed, which the mean gap of the chosen runs hides. """
    gpd = gpd_results(results)
    if not gpd:
        return []
    failed = failed_runs(planner, results)
    lines = ['', f'## Students that failed their DT (ended > {failed_gap(planner):g} test points behind it)', '',
             f'{len(failed)} of {len(gpd)} finished GPD runs.']
    for r in failed:
        student = r.column('test_top1')
        near_chance = sum(v is not None and v < CHANCE_TOP1 for v in student)
        lines.append(f"- {r.run.name}: student {r.final['test_top1']:.2f}, DT {r.final['test_dt_top1']:.2f} "
                     f"(DT - student {r.final['test_dt_top1'] - r.final['test_top1']:+.2f}); student under "
                     f'{CHANCE_TOP1:g} % in {near_chance} of {len(student)} epochs')
    return lines


def method_table(chosen: Dict[Tuple[str, str], List[Result]]) -> List[str]:
    lines = ['| student | method | lr | seeds | val top-1 | test top-1 | DT test top-1 | minutes per run |',
             '|---|---|---|---|---|---|---|---|']
    for (student, method), members in chosen.items():
        val = mean_std([r.final['eval_top1'] for r in members])
        test = mean_std([r.final['test_top1'] for r in members])
        dts = [r.final.get('test_dt_top1') for r in members]
        dt = pm(*mean_std(dts)) if all(d is not None for d in dts) else ''
        lines.append(f"| {student} | {method} | {lr_tag(members[0].run.args['lr'])} | {len(members)} | {pm(*val)} "
                     f"| {pm(*test)} | {dt} | {statistics.fmean(r.minutes for r in members):.1f} |")
    return lines


def comparison_table(comps: List[dict]) -> List[str]:
    lines = ['| student | claim | difference [95 % CI] | positive | per seed |', '|---|---|---|---|---|']
    lines += [f"| {c['student']} | {c['claim']} (`{c['first']}` - `{c['second']}`) | {fmt_ci(c)} "
              f"| {c['positive']}/{c['seeds']} | {c['per_seed']} |" for c in comps]
    return lines


def best_gpd_runs(planner: Planner, results: List[Result]) -> List[Result]:
    """ Per student, the finished GPD run (any GPD method, any lr or seed) with the best final
    validation top-1: the one to publish. """
    best: Dict[str, Result] = {}
    for r in results:
        if not r.run.args.get('gpd') or r.run.args.get('gpd_cbr_only'):
            continue
        if r.run.regime not in best or r.final['eval_top1'] > best[r.run.regime].final['eval_top1']:
            best[r.run.regime] = r
    return list(best.values())


def published_repo_id(student: str) -> str:
    """ Where a study's best GPD student of this architecture is published (its gpd_*.fmnist tag). """
    return f'{HUB_ORG}/{student}.gpd_fmnist'


def publish_command(planner: Planner, result: Result) -> str:
    # relative to the repository the results are in (a driver may run from another checkout)
    root = (repository_of(planner.runs_dir) or REPO_ROOT).resolve()

    def shown(path: Path) -> Path:
        try:
            return path.resolve().relative_to(root)
        except ValueError:
            return path
    final, notes = planner.runs_dir / result.run.name / FINAL_CHECKPOINT, planner.runs_dir.parent / CARD_NOTES
    return (f'`python -m hfhub.publish --checkpoint {shown(final)} --repo-id {published_repo_id(result.run.regime)} '
            f'--card-notes {shown(notes)} --dry-run DIR`')


def publish_best(planner: Planner, out_dir: Path, dry_run_dir: Path) -> List[Path]:
    """ Each student's best GPD run as hfhub.publish --dry-run writes it (DIR/<repo name>/), its
    card citing the study (card_notes.md). """
    from hfhub.publish import export_checkpoint
    notes_file = out_dir / CARD_NOTES
    notes = notes_file.read_text() if notes_file.exists() else None
    written = []
    for result in best_gpd_runs(planner, finished_results(planner)):
        final = planner.runs_dir / result.run.name / FINAL_CHECKPOINT
        if not final.exists():
            print(f'{result.run.name}: no {FINAL_CHECKPOINT} on this machine, not published', flush=True)
            continue
        repo_id = published_repo_id(result.run.regime)
        folder = export_checkpoint(final, dry_run_dir / repo_id.split('/')[1], repo_id, overwrite=True,
                                   card_notes=notes)
        print(f'{result.run.name} (val top-1 {result.final["eval_top1"]:.2f}) -> {folder} as {repo_id}', flush=True)
        written.append(folder)
    return written


def card_notes(planner: Planner, results: List[Result]) -> str:
    """ The model card section of a published study student: the study's tables. """
    chosen = chosen_runs(planner, results)
    lines = ['## How it compares: the timm-gpd Fashion-MNIST study', '',
             'Trained by `benchmarks/study.py` (timm-gpd), which compares GPD with plain training and '
             'distillation on the full Fashion-MNIST at equal length, every method at its own lr chosen on '
             f"the last {planner.study['train'].get('val_holdout', 0):,} training images, reported on the "
             f'test split. Full tables: `benchmarks/results/{planner.runs_dir.parent.name}/study.md` in timm-gpd.', '',
             '### Per method, at its chosen lr (top-1 %, mean ± std over seeds)', ''] + method_table(chosen)
    comps = comparisons(planner, results)
    if comps:
        lines += ['', '### Paired differences (test top-1, points, 95 % CI)', ''] + comparison_table(comps)
    return '\n'.join(lines) + '\n'


def write_plots(out_dir: Path, planner: Planner, results: List[Result]) -> List[Path]:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    chosen = chosen_runs(planner, results)
    students = list(planner.study['students'])
    paths = []
    methods = sorted({m for _, m in chosen})
    colors = {m: plt.get_cmap('tab20')(i) for i, m in enumerate(methods)}

    def panels(key: str, ylabel: str, filename: str, transform=None):
        fig, axes = plt.subplots(1, len(students), figsize=(6.5 * len(students), 4.5), squeeze=False)
        for ax, student in zip(axes[0], students):
            for (s, method), members in chosen.items():
                if s != student:
                    continue
                series = [r.column(key) for r in members]
                if not all(v is not None for sr in series for v in sr):
                    continue
                n = min(len(sr) for sr in series)
                mean = [statistics.fmean(sr[i] for sr in series) for i in range(n)]
                ax.plot(range(1, n + 1), mean, marker='.', color=colors[method], label=f'{method} (n={len(members)})')
            ax.set_title(student)
            ax.set_xlabel('epoch')
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    panels('test_top1', 'test top-1 (%)', 'test_top1_per_epoch.png')
    panels('test_gap_top1', 'DT - student test top-1 (points)', 'gap_per_epoch.png')
    fig, axes = plt.subplots(1, len(students), figsize=(6.5 * len(students), 4.5), squeeze=False)
    for ax, student in zip(axes[0], students):
        for (s, method), members in chosen.items():
            if s == student:
                ax.scatter([r.minutes for r in members], [r.final['test_top1'] for r in members],
                           color=colors[method], label=method, s=18)
        ax.set_title(f'{student}: accuracy vs training cost')
        ax.set_xlabel('wall minutes per run (2-core CPU unless noted in runs.csv)')
        ax.set_ylabel('final test top-1 (%)')
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / 'cost.png', dpi=110)
    plt.close(fig)
    paths.append(out_dir / 'cost.png')
    return paths


def collect(out_dir: Path, planner: Planner, quiet: bool = False) -> List[Path]:
    """ runs.csv, comparisons.csv, study.md and the plots from every finished run; the files written. """
    results = finished_results(planner)
    if not results:
        print(f'no finished runs under {planner.runs_dir}')
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / 'runs.csv', out_dir / 'study.md']
    accuracy.write_csv(out_dir / 'runs.csv', runs_rows(planner, results))
    comps = comparisons(planner, results)
    if comps:
        accuracy.write_csv(out_dir / 'comparisons.csv', comps)
        written.append(out_dir / 'comparisons.csv')
    text = study_markdown(planner, results)
    (out_dir / 'study.md').write_text(text)
    if best_gpd_runs(planner, results):
        (out_dir / CARD_NOTES).write_text(card_notes(planner, results))
        written.append(out_dir / CARD_NOTES)
    written += write_plots(out_dir, planner, results)
    if not quiet:
        print(text)
    return written


# ---------------------------------------------------------------- CLI

def epoch_minutes(planner: Planner, results: List[Result]) -> Dict[Tuple[str, str], float]:
    """ (student, method) -> minutes per epoch: the median of its finished runs, else the study
    YAML's `epoch_minutes` estimate. """
    out = {(st, m): float(v) for st, table in planner.study.get('epoch_minutes', {}).items()
           for m, v in table.items()}
    per: Dict[Tuple[str, str], List[float]] = {}
    for r in results:
        per.setdefault((r.run.regime, r.run.method), []).append(r.minutes / r.run.epochs)
    out.update({key: statistics.median(v) for key, v in per.items()})
    return out


def print_plan(planner: Planner):
    """ Every run's state and command, stage by stage, with the minutes it should take and the
    hours left. """
    costs = epoch_minutes(planner, finished_results(planner))
    left, unknown, current, stage_runs = 0.0, 0, None, 0

    def stage_end():
        if current is not None:
            print(f'# -- end of stage {current}: {stage_runs} run(s) left in it, ~{left / 60:.1f} h left to here')

    for number, item in planner.staged_plan():
        if number != current:
            stage_end()
            current, stage_runs = number, 0
            print(f'# -- stage {number}')
        if isinstance(item, Blocked):
            student, method = item.name.split('-')[:2]
            guess = costs.get((student, method))
            epochs = (planner.study['finetune']['epochs'] if method in FINETUNES
                      else planner.study['train']['epochs'])
            minutes = None if guess is None else guess * epochs
            state, command = f'blocked, {item.reason}', None
        else:
            state = state_of(item, planner.runs_dir)
            minutes = run_minutes(planner, item, state, costs)
            command = None if state == 'finished' else accuracy.command(item, planner.runs_dir,
                                                                        resume=state == 'resume')
        if state != 'finished':
            stage_runs += 1
            if minutes is None:
                unknown += 1
            else:
                left += minutes
        cost = '' if minutes is None or state == 'finished' else f' (~{minutes:.0f} min, ~{left / 60:.1f} h to here)'
        print(f'# {item.name}: {state}{cost}')
        if command:
            print('  ' + ' '.join(command[1:]))
    stage_end()
    print(f'# left: ~{left / 60:.1f} h of runs with an estimate'
          + (f', {unknown} run(s) without one' if unknown else ''))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', type=Path, default=STUDY_CONFIG, help='study YAML')
    p.add_argument('--output', type=Path, help='default: benchmarks/results/<config name without .yaml>')
    p.add_argument('--data-dir', type=Path, default=REPO_ROOT / 'data',
                   help='Fashion-MNIST root (laid out from the Debian package when missing)')
    p.add_argument('--only', nargs='+', metavar='METHOD_OR_RUN',
                   help='run only these methods or run names (and the runs they read: static teacher, '
                        'fine-tune start)')
    p.add_argument('--max-hours', type=float, help='start no new run after this many hours')
    p.add_argument('--finish-within', type=float, metavar='HOURS',
                   help='start a run only if its estimate (--dry-run) ends within this many hours of the start')
    p.add_argument('--jobs', type=int, default=1,
                   help='train up to this many runs side by side (a GPU has room for several small runs)')
    p.add_argument('--commit', action='store_true',
                   help="git-commit each finished run's summary, arguments and the rebuilt tables")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument('--dry-run', action='store_true', help='print the plan and the commands, run nothing')
    mode.add_argument('--collect-only', action='store_true', help='only rebuild tables and plots')
    mode.add_argument('--list-failed', action='store_true',
                      help='print the finished GPD runs whose student failed its DT, one per line')
    mode.add_argument('--publish-best', type=Path, metavar='DIR',
                      help="write each student's best GPD run as `hfhub.publish --dry-run` would, to DIR/<name>")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f'--jobs must be at least 1, got {args.jobs}')
    if args.finish_within is not None and args.finish_within <= 0:
        p.error(f'--finish-within takes hours > 0, got {args.finish_within}')
    name = args.config.stem.removeprefix('study_')
    args.output = (args.output or REPO_ROOT / 'benchmarks' / 'results' / f'study_{name}').resolve()
    args.data_dir = args.data_dir.resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    study = load_yaml(args.config)
    planner = Planner(study, args.output / 'runs', args.data_dir)
    if args.collect_only:
        return 0 if collect(args.output, planner) else 1
    if args.list_failed:
        print('\n'.join(r.run.name for r in failed_runs(planner, finished_results(planner))))
        return 0
    if args.publish_best:
        return 0 if publish_best(planner, args.output, args.publish_best) else 1
    if args.dry_run:
        print_plan(planner)
        return 0
    accuracy.ensure_data(args.data_dir)
    args.output.mkdir(parents=True, exist_ok=True)
    ignore = args.output / '.gitignore'
    if not ignore.exists():  # summaries and tables are committed, weights and logs are not
        ignore.write_text('logs/\n*.pth\n*.safetensors\n*.tmp\n.lock\n')
    lock = open(args.output / '.lock', 'w')
    try:  # two drivers on one output would train the same run twice
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise SystemExit(f'another benchmarks/study.py is running on {args.output}')
    ok = run_study(planner, args.output, args.max_hours, args.commit, args.only, jobs=args.jobs,
                   finish_within=args.finish_within)
    collect(args.output, planner)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
