""" benchmarks/study.py: the plan (sweep, choice on validation, edge extension, derived and
fine-tune runs), the tables (runs.csv, paired differences with 95 % CIs) and one tiny real run. """
import csv
import math
import subprocess
import sys

import pytest
import yaml


@pytest.fixture(scope='module')
def study(load_script):
    return load_script('benchmarks/study.py', 'study')


STUDY = dict(
    students={'resnet18': dict(teacher='resnet34', methods=[
        'baseline', 'dkd', 'gpd_scratch', 'gpd_nocbr', 'baseline_r2lr', 'finetune_plain'])},
    lrs=[0.025, 0.05, 0.1], extend_edges=True, seeds=2, headline_seeds=3, headline=['baseline'],
    train=dict(batch_size=128, epochs=2, val_holdout=5000),
    teacher=dict(epochs=3, lr=0.1),
    derived=dict(gpd_nocbr=dict(lr_from='gpd_scratch'),
                 baseline_r2lr=dict(lr_from='gpd_scratch', lr_scale=4.0, wd_scale=0.25)),
    finetune=dict(epochs=1, lr_scale=0.1, warmup_epochs=0),
)


def finish(run_dir, run, val, test=None, gap=None):
    """ A finished run as train.py leaves it: args.yaml, summary.csv with every epoch, the student. """
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / 'args.yaml').write_text(yaml.safe_dump(run.args))
    test = val if test is None else test
    with open(run_dir / 'summary.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=['epoch', 'eval_top1', 'test_top1', 'test_dt_top1', 'test_gap_top1',
                                          'epoch_time'])
        w.writeheader()
        for epoch in range(run.epochs):
            last = epoch == run.epochs - 1
            w.writerow(dict(epoch=epoch, eval_top1=val if last else val - 1, test_top1=test if last else test - 1,
                            test_dt_top1='' if gap is None else test + gap, test_gap_top1='' if gap is None else gap,
                            epoch_time=60.0))
    (run_dir / 'student.safetensors').write_bytes(b'')


def planned(planner):
    from accuracy import Run
    return {item.name: item for item in planner.plan() if isinstance(item, Run)}


def blocked(planner, study):
    return {item.name: item.reason for item in planner.plan() if isinstance(item, study.Blocked)}


def test_plan_chooses_on_validation_and_extends_the_grid_at_an_edge(study, tmp_path):
    runs_dir = tmp_path / 'runs'
    planner = study.Planner(STUDY, runs_dir, tmp_path / 'data')
    runs = planned(planner)
    assert list(runs)[0] == 'teacher-resnet34'  # dkd needs it: trained first
    assert runs['teacher-resnet34'].args['epochs'] == 3 and runs['teacher-resnet34'].args['model'] == 'resnet34'
    sweep = [n for n in runs if n.endswith('-s0') and 'baseline-' in n]
    assert sweep == ['resnet18-baseline-lr0.025-s0', 'resnet18-baseline-lr0.05-s0', 'resnet18-baseline-lr0.1-s0']
    assert runs['resnet18-dkd-lr0.05-s0'].needs == ('teacher-resnet34',)
    assert runs['resnet18-dkd-lr0.05-s0'].args['teacher_checkpoint'].endswith('teacher-resnet34/student.safetensors')
    assert runs['resnet18-gpd_scratch-lr0.05-s0'].args['gpd_seed'] == 0
    assert 'resnet18-baseline_r2lr-s0' in blocked(planner, study)

    # the baseline's best validation is in the middle: chosen; its test top-1 says otherwise and is ignored
    for lr, val, test in ((0.025, 80.0, 95.0), (0.05, 85.0, 70.0), (0.1, 84.0, 70.0)):
        finish(runs_dir / f'resnet18-baseline-lr{lr:g}-s0', runs[f'resnet18-baseline-lr{lr:g}-s0'], val, test)
    assert planner.chosen_lr('resnet18', 'baseline') == 0.05
    runs = planned(planner)
    assert {'resnet18-baseline-lr0.05-s1', 'resnet18-baseline-lr0.05-s2'} <= set(runs)  # 3 headline seeds
    assert 'resnet18-baseline-lr0.05-s3' not in runs
    ft = runs['resnet18-finetune_plain-lr0.005-s1']
    assert ft.args['initial_checkpoint'].endswith('resnet18-baseline-lr0.05-s1/student.safetensors')
    assert ft.needs == ('resnet18-baseline-lr0.05-s1',) and ft.epochs == 1 and ft.args['warmup_epochs'] == 0

    # GPD's best is the smallest lr: one more value below it, then the choice
    for lr, val in ((0.025, 90.0), (0.05, 85.0), (0.1, 80.0)):
        finish(runs_dir / f'resnet18-gpd_scratch-lr{lr:g}-s0', runs[f'resnet18-gpd_scratch-lr{lr:g}-s0'], val)
    assert planner.chosen_lr('resnet18', 'gpd_scratch') is None
    runs = planned(planner)
    assert 'resnet18-gpd_scratch-lr0.0125-s0' in runs
    finish(runs_dir / 'resnet18-gpd_scratch-lr0.0125-s0', runs['resnet18-gpd_scratch-lr0.0125-s0'], 91.0)
    assert planner.chosen_lr('resnet18', 'gpd_scratch') == 0.0125  # extended once only, even at the edge again
    runs = planned(planner)
    r2 = runs['resnet18-baseline_r2lr-lr0.05-s0']
    assert r2.args['weight_decay'] == pytest.approx(5e-5 * 0.25)  # recipe.yaml's 5e-5 / ratio**2
    assert runs['resnet18-gpd_nocbr-lr0.0125-s1'].args['no_gpd_cbr'] is True
    assert not any('gpd_nocbr' in n or 'r2lr' in n for n in blocked(planner, study))


def test_collect_writes_runs_csv_and_paired_confidence_intervals(study, tmp_path):
    runs_dir = tmp_path / 'runs'
    cfg = dict(STUDY, students={'resnet18': dict(teacher='resnet34', methods=['baseline', 'gpd_scratch'])},
               lrs=[0.05], extend_edges=False, seeds=3, headline=[])
    planner = study.Planner(cfg, runs_dir, tmp_path / 'data')
    runs = planned(planner)
    finish(runs_dir / 'resnet18-baseline-lr0.05-s0', runs['resnet18-baseline-lr0.05-s0'], 80, 80)
    finish(runs_dir / 'resnet18-gpd_scratch-lr0.05-s0', runs['resnet18-gpd_scratch-lr0.05-s0'], 81, 81, gap=-1.0)
    runs = planned(planner)
    for seed, (b, g) in enumerate(((80, 81), (81, 83), (79, 82))):
        if seed:
            finish(runs_dir / f'resnet18-baseline-lr0.05-s{seed}', runs[f'resnet18-baseline-lr0.05-s{seed}'], b, b)
            finish(runs_dir / f'resnet18-gpd_scratch-lr0.05-s{seed}', runs[f'resnet18-gpd_scratch-lr0.05-s{seed}'],
                   g, g, gap=0.5)
    # seed 1 of the baseline gains 0.8 over its last fifth instead of finish()'s 0.4
    summary = runs_dir / 'resnet18-baseline-lr0.05-s1' / 'summary.csv'
    with open(summary, newline='') as f:
        epochs = list(csv.DictReader(f))
    epochs[0]['eval_top1'] = 79.0
    with open(summary, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(epochs[0]))
        w.writeheader()
        w.writerows(epochs)
    out = tmp_path / 'out'
    written = study.collect(out, planner, quiet=True)
    assert out / 'runs.csv' in written and (out / 'gap_per_epoch.png').exists() and (out / 'cost.png').exists()
    with open(out / 'runs.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert {'method', 'student', 'teacher', 'seed', 'lr', 'wd', 'epochs', 'images', 'val_top1', 'test_top1',
            'val_gain_last_fifth',
            'dt_test_top1', 'wall_minutes', 'processor', 'git_commit'} <= set(rows[0])
    assert {r['images'] for r in rows} == {'55000'} and {float(r['wall_minutes']) for r in rows} == {2.0}
    (comp,) = study.comparisons(planner, study.finished_results(planner))
    assert comp['claim'] == 'GPD > baseline (no static teacher)' and comp['seeds'] == 3
    # differences 1, 2, 3: mean 2, sample std 1, t(0.975, 2 df) = 4.303
    half = 4.303 / math.sqrt(3)
    assert (comp['diff_mean'], comp['ci_low'], comp['ci_high']) == pytest.approx((2, 2 - half, 2 + half))
    text = (out / 'study.md').read_text()
    assert '+2.00 [-0.48, +4.48]' in text and '3/3' in text
    assert '- resnet18 gpd_scratch: +0.00 +0.00' in text  # the gap per epoch, averaged over seeds (-1, +0.5, +0.5)
    # finish() writes 2 epochs, the first one point below the last: read at 1.6 epochs, +0.4
    assert '- resnet18-gpd_scratch-lr0.05-s2: +0.40 (2 epochs)' in text
    # the GPD run to publish: the best validation top-1 (seed 1's 83), with the study's card section
    assert '- resnet18: `resnet18-gpd_scratch-lr0.05-s1`, val 83.00, test 83.00' in text
    assert f"--checkpoint {runs_dir / 'resnet18-gpd_scratch-lr0.05-s1' / 'final.pth'}" in text
    notes = (out / 'card_notes.md').read_text()
    assert out / 'card_notes.md' in written and '+2.00 [-0.48, +4.48]' in notes and '| resnet18 | gpd_scratch |' in notes
    gains = {(r['method'], r['seed']): float(r['val_gain_last_fifth']) for r in rows}
    assert gains.pop(('baseline', '1')) == pytest.approx(0.8)
    assert list(gains.values()) == pytest.approx([0.4] * 5)
    assert '- resnet18 baseline at lr 0.05, mean of 3 seeds: +0.53' in text
    assert '- resnet18 gpd_scratch at lr 0.05, mean of 3 seeds: +0.40' in text


def test_commit_paths_leaves_others_staged_work_alone(study, tmp_path, monkeypatch):
    repo = tmp_path / 'repo'
    repo.mkdir()
    git = ['git', '-C', str(repo), '-c', 'user.name=t', '-c', 'user.email=t@t']
    subprocess.run([*git, 'init', '-q'], check=True)
    (repo / 'other.py').write_text('x = 1\n')
    subprocess.run([*git, 'add', 'other.py'], check=True)  # someone else's staged change
    (repo / 'runs').mkdir()
    result = repo / 'runs' / 'summary.csv'
    result.write_text('epoch\n0\n')
    monkeypatch.setenv('GIT_AUTHOR_NAME', 't'), monkeypatch.setenv('GIT_AUTHOR_EMAIL', 't@t')
    monkeypatch.setenv('GIT_COMMITTER_NAME', 't'), monkeypatch.setenv('GIT_COMMITTER_EMAIL', 't@t')
    study.git_commit_paths([result], 'study: a run finished')
    tree = subprocess.run([*git, 'ls-tree', '-r', '--name-only', 'HEAD'], capture_output=True, text=True).stdout
    assert tree.split() == ['runs/summary.csv']
    staged = subprocess.run([*git, 'diff', '--cached', '--name-only'], capture_output=True, text=True).stdout
    assert staged.split() == ['other.py']


def test_tiny_study_end_to_end(repo_root, fashion_mnist_root, tmp_path):
    """ Two swept lrs of a tiny baseline, then its second seed, with the real train.py: held-out
    validation and test columns reach runs.csv, and a rerun has nothing left to do. """
    cfg = tmp_path / 'study_tiny.yaml'
    cfg.write_text(yaml.safe_dump(dict(
        students={'test_resnet': dict(teacher='test_resnet', methods=['baseline'])},
        lrs=[0.05, 0.1], extend_edges=False, seeds=2, headline_seeds=2, headline=[],
        train=dict(batch_size=16, validation_batch_size=1000, epochs=1, warmup_epochs=0, val_holdout=32,
                   train_limit=64, workers=0, precise_bn=0), teacher=dict(epochs=1))))
    out = tmp_path / 'out'
    cmd = [sys.executable, 'benchmarks/study.py', '--config', str(cfg),
           '--output', str(out), '--data-dir', str(fashion_mnist_root)]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out / 'runs.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert sorted((r['lr'], r['seed']) for r in rows) in (
        [('0.05', '0'), ('0.05', '1'), ('0.1', '0')], [('0.05', '0'), ('0.1', '0'), ('0.1', '1')])
    assert all(float(r['test_top1']) >= 0 and r['images'] == '64' and r['processor'] for r in rows)
    assert not list(out.glob('runs/*/last.pth'))  # finished runs keep their final weights only
    finals = sorted(out.glob('runs/*/final.pth'))
    assert len(finals) == 3
    from hfhub.publish import export_checkpoint
    from timm_gpd.checkpoint import load_checkpoint
    assert 'optimizer' not in load_checkpoint(finals[0])  # what only resuming needs is dropped
    published = export_checkpoint(finals[0], tmp_path / 'hub', 'org/test_resnet.study')  # still publishable
    assert (published / 'model.safetensors').exists() and 'test_resnet' in (published / 'README.md').read_text()
    again = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and ': training (' not in again.stdout and ': resuming (' not in again.stdout


def test_a_run_finished_without_its_driver_is_collected_not_retrained(study, tmp_path):
    """ The driver was killed while train.py went on to finish: the next driver records, prunes
    and collects that run instead of training it again; in a clone without its weights, a run
    that reads them waits with a clear message. """
    runs_dir, out = tmp_path / 'out' / 'runs', tmp_path / 'out'
    cfg = dict(STUDY, students={'resnet18': dict(teacher='resnet34', methods=['baseline', 'finetune_plain'])},
               lrs=[0.05], extend_edges=False, seeds=1, headline_seeds=1, headline=[])
    planner = study.Planner(cfg, runs_dir, tmp_path / 'data')
    base = planned(planner)['resnet18-baseline-lr0.05-s0']
    finish(runs_dir / base.name, base, 80)
    (runs_dir / base.name / 'last.pth').write_bytes(b'x')
    (runs_dir / base.name / 'student.safetensors').unlink()  # a clone: the summary only
    assert study.run_study(planner, out, None, False, None) is False  # the fine-tune cannot start
    assert study.read_info(runs_dir / base.name)['finished'] is True
    assert not (runs_dir / base.name / 'last.pth').exists() and (out / 'runs.csv').exists()
    assert not (runs_dir / base.name / 'final.pth').exists()  # that last.pth was not a checkpoint
    assert study.state_of(base, runs_dir) == 'finished'


def test_stages_order_the_plan_and_must_cover_every_method(study, tmp_path):
    """ `stages`: the headline pair's sweeps and seeds come before the static teacher's methods,
    a later stage adds seeds up to the full count; a method left out of every stage is refused. """
    cfg = dict(STUDY, stages=[dict(methods=['baseline', 'gpd_scratch'], seeds=2),
                              dict(methods=['dkd', 'gpd_nocbr', 'baseline_r2lr', 'finetune_plain'], seeds=2),
                              dict(methods=['baseline'])])
    runs_dir = tmp_path / 'runs'
    planner = study.Planner(cfg, runs_dir, tmp_path / 'data')
    names = list(planned(planner))
    assert names[:6] == [f'resnet18-{m}-lr{lr:g}-s0' for m in ('baseline', 'gpd_scratch') for lr in (0.025, 0.05, 0.1)]
    assert names.index('teacher-resnet34') == 6  # the first stage needs no static teacher
    runs = planned(planner)
    for method, best in (('baseline', 0.05), ('gpd_scratch', 0.05)):
        for lr in (0.025, 0.05, 0.1):
            finish(runs_dir / f'resnet18-{method}-lr{lr:g}-s0', runs[f'resnet18-{method}-lr{lr:g}-s0'],
                   90.0 if lr == best else 80.0)
    names = list(planned(planner))
    # stage 1's seeds stop at its cap; the headline baseline's third seed waits for the last stage
    assert names.index('resnet18-gpd_scratch-lr0.05-s1') < names.index('teacher-resnet34')
    assert names.index('resnet18-gpd_nocbr-lr0.05-s1') < names.index('resnet18-baseline-lr0.05-s2') == len(names) - 1
    with pytest.raises(ValueError, match='in no stage: resnet18:finetune_plain'):
        study.Planner(dict(cfg, stages=cfg['stages'][:1] + [dict(methods=['dkd', 'gpd_nocbr', 'baseline_r2lr'])]),
                      runs_dir, tmp_path / 'data').plan()
    with pytest.raises(ValueError, match='kd not a method'):
        study.Planner(dict(cfg, stages=cfg['stages'] + [dict(methods=['kd'])]), runs_dir, tmp_path / 'data').plan()


def test_dry_run_estimates_the_hours_left_from_finished_runs(study, tmp_path, capsys):
    cfg = dict(STUDY, students={'resnet18': dict(teacher='resnet34', methods=['baseline', 'gpd_scratch'])},
               lrs=[0.05, 0.1], extend_edges=False, seeds=2, headline=[],
               epoch_minutes={'resnet18': {'gpd_scratch': 10.0}})
    runs_dir = tmp_path / 'runs'
    planner = study.Planner(cfg, runs_dir, tmp_path / 'data')
    finish(runs_dir / 'resnet18-baseline-lr0.05-s0', planned(planner)['resnet18-baseline-lr0.05-s0'], 80)
    gpd = planned(planner)['resnet18-gpd_scratch-lr0.05-s0']  # halfway: 1 of its 2 epochs left
    finish(runs_dir / gpd.name, gpd, 70)
    rows = (runs_dir / gpd.name / 'summary.csv').read_text().splitlines()
    (runs_dir / gpd.name / 'summary.csv').write_text('\n'.join(rows[:2]) + '\n')
    (runs_dir / gpd.name / 'last.pth').write_bytes(b'x')
    study.print_plan(planner)
    out = capsys.readouterr().out
    assert '# resnet18-gpd_scratch-lr0.05-s0: resume (~10 min, ~0.2 h to here)' in out
    # the finished baseline took 1 min per epoch (finish() writes 60 s epochs): 2 min per run
    assert '# resnet18-baseline-lr0.05-s0: finished\n' in out
    assert '# resnet18-baseline-lr0.1-s0: new (~2 min, ~0.0 h to here)' in out
    assert '# resnet18-gpd_scratch-lr0.1-s0: new (~20 min, ~0.5 h to here)' in out
    assert '# resnet18-baseline-s1: blocked, waits for its sweep (~2 min' in out
    assert out.startswith('# -- stage 1\n')  # no `stages`: one stage of everything
    assert '# -- end of stage 1: 5 run(s) left in it, ~0.9 h left to here' in out
    assert out.rstrip().endswith('# left: ~0.9 h of runs with an estimate')  # 2 + 10 + 20 + 2 + 20 min


def test_last_fifth_gain_interpolates_at_four_fifths_of_training(study):
    assert study.last_fifth_gain([80, 85, 87, 88, 88.42]) == pytest.approx(0.42)  # after epoch 4 of 5
    # 8 epochs: from 6.4 epochs of training, 40 % of the way from the 6th epoch's value to the 7th's
    assert study.last_fifth_gain([70, 80, 85, 86, 87, 88, 89, 89.5]) == pytest.approx(89.5 - 88.4)
    assert study.last_fifth_gain([80]) is None


class FakeTrain:
    """ train.py as run_study sees it: a process that finishes its run (or fails) after a poll. """

    def __init__(self, run_dir, run, val, fail=False):
        self.run_dir, self.run, self.val, self.fail, self.polls = run_dir, run, val, fail, 0
        self.returncode = None

    def poll(self):
        self.polls += 1
        if self.polls < 2:
            return None
        if self.returncode is None:
            if not self.fail:
                finish(self.run_dir, self.run, self.val)
            self.returncode = 1 if self.fail else 0
        return self.returncode


def test_jobs_train_runs_side_by_side_and_the_plan_moves_on_as_they_finish(study, tmp_path, monkeypatch, capsys):
    """ --jobs 3: the sweep's runs start together (never more than 3 at once), the seeds follow
    the choice; a failed run starts nothing new but the running ones finish; --finish-within
    leaves out runs whose estimate does not fit. """
    cfg = dict(STUDY, students={'resnet18': dict(teacher='resnet34', methods=['baseline'])},
               lrs=[0.025, 0.05, 0.1], extend_edges=False, seeds=3, headline=[],
               epoch_minutes={'resnet18': {'baseline': 1.0}})
    out = tmp_path / 'out'
    planner = study.Planner(cfg, out / 'runs', tmp_path / 'data')
    launched, alive = [], []

    def launch(run, runs_dir, logs_dir, resume, fail=()):
        assert sum(p.returncode is None for p in alive) < 3
        launched.append(run.name)
        proc = FakeTrain(runs_dir / run.name, run, 90.0 if run.args['lr'] == 0.05 else 80.0,
                         fail=run.name in fail)
        alive.append(proc)
        return proc

    monkeypatch.setattr(study.accuracy, 'launch', launch)
    assert study.run_study(planner, out, None, False, None, jobs=3, poll_seconds=0) is True
    assert launched[:3] == [f'resnet18-baseline-lr{lr:g}-s0' for lr in (0.025, 0.05, 0.1)]
    assert launched[3:] == ['resnet18-baseline-lr0.05-s1', 'resnet18-baseline-lr0.05-s2']

    out2 = tmp_path / 'out2'
    planner = study.Planner(cfg, out2 / 'runs', tmp_path / 'data')
    launched.clear()
    monkeypatch.setattr(study.accuracy, 'launch',
                        lambda *a, **k: launch(*a, **k, fail={'resnet18-baseline-lr0.025-s0'}))
    assert study.run_study(planner, out2, None, False, None, jobs=2, poll_seconds=0) is False
    assert launched == ['resnet18-baseline-lr0.025-s0', 'resnet18-baseline-lr0.05-s0']
    assert study.state_of(planner.method_run('resnet18', 'baseline', 0.05, 0), out2 / 'runs') == 'finished'

    out3 = tmp_path / 'out3'  # 2 epochs of 1 min each: a 2-minute run does not fit in 1.5 minutes
    launched.clear()
    monkeypatch.setattr(study.accuracy, 'launch', launch)
    planner = study.Planner(cfg, out3 / 'runs', tmp_path / 'data')
    assert study.run_study(planner, out3, None, False, None, jobs=3, finish_within=1.5 / 60, poll_seconds=0)
    assert launched == []
    assert study.run_study(planner, out3, None, False, None, jobs=3, finish_within=2.5 / 60, poll_seconds=0)
    assert len(launched) == 5
    for flags, message in ((['--jobs', '0'], '--jobs must be at least 1'),
                           (['--finish-within', '0'], '--finish-within takes hours > 0')):
        with pytest.raises(SystemExit):
            study.parse_args(flags)
        assert message in capsys.readouterr().err


def test_a_started_run_resumes_before_new_runs_start(study, tmp_path, monkeypatch, capsys):
    """ A driver restarted after an interruption continues the run it left half-trained (its
    checkpoint) before it starts runs that come earlier in the plan. """
    cfg = dict(STUDY, students={'resnet18': dict(teacher='resnet34', methods=['baseline'])},
               lrs=[0.025, 0.05, 0.1], extend_edges=False, seeds=1, headline=[])
    out = tmp_path / 'out'
    planner = study.Planner(cfg, out / 'runs', tmp_path / 'data')
    started = planned(planner)['resnet18-baseline-lr0.1-s0']
    run_dir = out / 'runs' / started.name
    finish(run_dir, started, 85.0)
    rows = (run_dir / 'summary.csv').read_text().splitlines()
    (run_dir / 'summary.csv').write_text('\n'.join(rows[:2]) + '\n')  # the first of 2 epochs
    (run_dir / 'last.pth').write_bytes(b'')
    assert study.state_of(started, out / 'runs') == 'resume'
    launched = []

    def launch(run, runs_dir, logs_dir, resume):
        launched.append((run.name, resume))
        return FakeTrain(runs_dir / run.name, run, 80.0)

    monkeypatch.setattr(study.accuracy, 'launch', launch)
    assert study.run_study(planner, out, None, False, None, jobs=1, poll_seconds=0) is True
    assert launched == [('resnet18-baseline-lr0.1-s0', True), ('resnet18-baseline-lr0.025-s0', False),
                        ('resnet18-baseline-lr0.05-s0', False)]
    assert 'resnet18-baseline-lr0.1-s0: resuming' in capsys.readouterr().out


def baseline_and_gpd_study(study, tmp_path, name: str):
    """ (config, output dir, planner, planned runs) of a resnet18 baseline + GPD scratch study over
    lr 0.05 and 0.1, one seed: nothing finished yet. """
    cfg = dict(STUDY, students={'resnet18': dict(teacher='resnet34', methods=['baseline', 'gpd_scratch'])},
               lrs=[0.05, 0.1], extend_edges=False, seeds=1, headline=[])
    out = tmp_path / name
    planner = study.Planner(cfg, out / 'runs', tmp_path / 'data')
    return cfg, out, planner, planned(planner)


def test_publish_best_writes_each_students_best_gpd_run_with_the_study_card(study, tmp_path, monkeypatch):
    _, out, planner, runs = baseline_and_gpd_study(study, tmp_path, 'study_fmnist_gpu')
    for name, val in (('resnet18-baseline-lr0.05-s0', 95.0), ('resnet18-gpd_scratch-lr0.05-s0', 85.0),
                      ('resnet18-gpd_scratch-lr0.1-s0', 80.0)):
        finish(out / 'runs' / name, runs[name], val)
        (out / 'runs' / name / 'final.pth').write_bytes(b'x')
    study.collect(out, planner, quiet=True)
    assert 'benchmarks/results/study_fmnist_gpu/study.md' in (out / 'card_notes.md').read_text()
    calls = []
    import hfhub.publish
    monkeypatch.setattr(hfhub.publish, 'export_checkpoint',
                        lambda ckpt, folder, repo_id, **kw: calls.append((ckpt, folder, repo_id, kw)) or folder)
    assert study.publish_best(planner, out, tmp_path / 'hub') == [tmp_path / 'hub' / 'resnet18.gpd_fmnist']
    (ckpt, folder, repo_id, kw), = calls  # the better GPD run, not the (better) baseline
    assert ckpt == out / 'runs' / 'resnet18-gpd_scratch-lr0.05-s0' / 'final.pth'
    assert repo_id == f'{study.HUB_ORG}/resnet18.gpd_fmnist' and '## How it compares' in kw['card_notes']


def test_publish_command_names_paths_in_the_results_repository(study, tmp_path):
    """ study.md's publish command is relative to the repository that holds the results, also
    when the driver runs from another checkout (its own REPO_ROOT). """
    subprocess.run(['git', 'init', '-q', str(tmp_path / 'elsewhere')], check=True)
    _, out, planner, runs = baseline_and_gpd_study(study, tmp_path, 'elsewhere/results')
    finish(out / 'runs' / 'resnet18-gpd_scratch-lr0.05-s0', runs['resnet18-gpd_scratch-lr0.05-s0'], 85.0)
    best, = [r for r in study.finished_results(planner) if r.run.method == 'gpd_scratch']
    command = study.publish_command(planner, best)
    assert '--checkpoint results/runs/resnet18-gpd_scratch-lr0.05-s0/final.pth ' in command
    assert '--card-notes results/card_notes.md ' in command


def test_a_time_boxed_session_packs_what_must_travel_back(repo_root, fashion_mnist_root, tmp_path):
    """ benchmarks/study_session.sh: the runs that fit, side by side, then the tables, the best GPD
    student exported and split, everything packed in ARCHIVE_DIR without weights. """
    import os
    import tarfile
    cfg = tmp_path / 'study_tiny.yaml'
    cfg.write_text(yaml.safe_dump(dict(
        students={'test_resnet': dict(teacher='test_resnet', methods=['baseline', 'gpd_scratch'])},
        lrs=[0.1], extend_edges=False, seeds=1, headline_seeds=1, headline=[],
        failed_student_gap=-100.0,  # every GPD student counts as failed: the session checks its BatchNorm
        epoch_minutes={'test_resnet': {'baseline': 0.5, 'gpd_scratch': 0.5}},
        train=dict(batch_size=16, validation_batch_size=1000, epochs=1, warmup_epochs=0, val_holdout=32,
                   train_limit=64, workers=0, precise_bn=0), teacher=dict(epochs=1))))
    archive, out = tmp_path / 'archive', tmp_path / 'study_tiny'
    env = dict(os.environ, PYTHON=sys.executable, STUDY_OUTPUT=str(out), DATA_DIR=str(fashion_mnist_root),
               GPD_STUDY_COMMIT='abc1234')
    proc = subprocess.run(['bash', 'benchmarks/study_session.sh', str(cfg), '4', '2', str(archive),
                           'test_resnet.gpd_fmnist'], cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'runs must end within 0.0167 h' in proc.stdout  # 4 min - 150 s for the tables and checks - 30 s
    with tarfile.open(archive / 'results.tgz') as tar:
        names = tar.getnames()
    assert 'study_tiny/runs.csv' in names and 'study_tiny/runs/test_resnet-gpd_scratch-lr0.1-s0/summary.csv' in names
    assert not [n for n in names if n.endswith(('.pth', '.safetensors')) or '/logs' in n]
    assert '"abc1234"' in (out / 'runs' / 'test_resnet-gpd_scratch-lr0.1-s0' / 'study.json').read_text()
    pieces = sorted(archive.glob('pub.tar.*'))
    assert pieces and all(p.stat().st_size <= 15 * 2 ** 20 for p in pieces)
    joined = tmp_path / 'pub.tar'
    joined.write_bytes(b''.join(p.read_bytes() for p in pieces))
    with tarfile.open(joined) as tar:
        assert 'test_resnet.gpd_fmnist/model.safetensors' in tar.getnames()
    checked = (archive / 'bn_check.txt').read_text()
    assert 'test_resnet-gpd_scratch-lr0.1-s0/final.pth: validation top-1' in checked and 'batch stats' in checked
    with tarfile.open(archive / 'logtails.tgz') as tar:
        assert len([n for n in tar.getnames() if n.endswith('.log')]) == 2
    spread = (archive / 'replica_spread.txt').read_text()
    assert 'test_resnet-gpd_scratch-lr0.1-s0/final.pth (epoch 0): DT ratio 2, 32 val images' in spread
    assert 'per stage' in spread and 'baseline' not in spread


def test_study_md_lists_the_gpd_students_that_failed_their_dt(study, tmp_path, capsys):
    cfg, out, planner, runs = baseline_and_gpd_study(study, tmp_path, 'out')
    finish(out / 'runs' / 'resnet18-gpd_scratch-lr0.05-s0', runs['resnet18-gpd_scratch-lr0.05-s0'], 90.0, gap=0.5)
    finish(out / 'runs' / 'resnet18-gpd_scratch-lr0.1-s0', runs['resnet18-gpd_scratch-lr0.1-s0'], 12.0, gap=70.0)
    finish(out / 'runs' / 'resnet18-baseline-lr0.1-s0', runs['resnet18-baseline-lr0.1-s0'], 90.0)
    study.collect(out, planner, quiet=True)
    md = (out / 'study.md').read_text()
    section = md.split('## Students that failed their DT (ended > 5 test points behind it)')[1]
    assert '1 of 2 finished GPD runs.' in section
    # finish() writes the last epoch's top-1 and 1 point less before it: 11 and 12, both near chance
    assert '- resnet18-gpd_scratch-lr0.1-s0: student 12.00, DT 82.00 (DT - student +70.00); student under 15 % ' \
           'in 2 of 2 epochs' in section
    assert 'lr0.05' not in section
    config = tmp_path / 'study_x.yaml'
    config.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert study.main(['--config', str(config), '--output', str(out), '--list-failed']) == 0
    assert capsys.readouterr().out.split() == ['resnet18-gpd_scratch-lr0.1-s0']


def test_model_kwargs_reach_train_py_as_it_records_them(study, load_script, tmp_path):
    """ wide_baseline's --model-kwargs: the argv the driver builds parses back, through train.py's
    own parser and its args.yaml, to the planned value, so a finished run matches its plan. """
    import accuracy
    train = load_script('train.py', 'train_for_study')
    cfg = dict(STUDY, students={'resnet18': dict(teacher='resnet34', methods=['baseline', 'wide_baseline'])},
               derived=dict(wide_baseline=dict(lr_from='baseline')))
    planner = study.Planner(cfg, tmp_path / 'runs', tmp_path / 'data')
    for lr, val in zip(cfg['lrs'], (90.0, 91.0, 90.5)):
        run = planner.method_run('resnet18', 'baseline', lr, 0)
        finish(tmp_path / 'runs' / run.name, run, val)
    wide = planned(planner)['resnet18-wide_baseline-lr0.05-s0']
    assert wide.args['model_kwargs'] == {'channels': [128, 256, 512, 1024]}
    parsed = train.build_parser().parse_args(accuracy.to_argv(wide.args))
    assert parsed.model_kwargs == {'channels': [128, 256, 512, 1024]}
    run_dir = tmp_path / 'runs' / wide.name
    run_dir.mkdir()
    (run_dir / 'args.yaml').write_text(yaml.safe_dump(vars(parsed)))  # what train.py records
    assert accuracy.run_state(wide, tmp_path / 'runs') == 'stale'  # same arguments: no SystemExit
