""" benchmarks/accuracy.py without training: plan and commands (--dry-run), and the aggregation and
plots on hand-made summary.csv files. """
import csv
import math
import statistics

import pytest
import yaml


@pytest.fixture(scope='module')
def bench(load_script):
    return load_script('benchmarks/accuracy.py', 'accuracy_bench')


def quick_profile(bench):
    return bench.load_yaml(bench.CONFIG_DIR / 'profile_quick.yaml')


def flag_value(cmd, flag):
    return cmd[cmd.index(flag) + 1]


# ---------------------------------------------------------------- commands

def test_dry_run_commands(bench, tmp_path, capsys):
    out = tmp_path / 'out'
    assert bench.main(['--quick', '--dry-run', '--only', 'kd', 'finetune_gpd', '--seeds', '3',
                       '--output', str(out), '--data-dir', str(tmp_path / 'data')]) == 0
    printed = capsys.readouterr().out
    assert not out.exists(), 'a dry run writes nothing'

    commands = {}
    for line in printed.splitlines():
        if not line.startswith('#'):
            cmd = line.split()
            commands[flag_value(cmd, '--experiment')] = cmd
    regimes = list(quick_profile(bench)['regimes'])
    # teachers first; the fine-tune pulls in its baseline, which runs before it
    expected = [f'{r}-teacher' for r in regimes]
    for r in regimes:
        expected += [f'{r}-baseline-s3', f'{r}-kd-s3', f'{r}-finetune_gpd-s3']
    assert list(commands) == expected

    runs = out.resolve() / 'runs'
    teacher = commands['full-teacher']
    assert teacher[1] == 'train.py' and flag_value(teacher, '--model') == 'resnet34'
    assert '--teacher' not in teacher and '--gpd' not in teacher

    kd = commands['low-kd-s3']
    assert flag_value(kd, '--model') == 'resnet18' and flag_value(kd, '--in-chans') == '1'
    assert flag_value(kd, '--teacher') == 'resnet34' and flag_value(kd, '--kd-loss') == 'kd'
    assert flag_value(kd, '--teacher-checkpoint') == str(runs / 'low-teacher' / 'student.safetensors')
    assert flag_value(kd, '--seed') == '3' and flag_value(kd, '--output') == str(runs)

    finetune = commands['full-finetune_gpd-s3']
    assert '--gpd' in finetune and flag_value(finetune, '--gpd-seed') == '3'
    assert flag_value(finetune, '--initial-checkpoint') == str(runs / 'full-baseline-s3' / 'student.safetensors')

    # the low-data regime trains on a tenth of the images; every run validates on the same subset
    limits = {r: int(flag_value(commands[f'{r}-baseline-s3'], '--train-limit')) for r in regimes}
    assert limits['low'] * 10 == limits['full']
    assert len({flag_value(c, '--val-limit') for c in commands.values()}) == 1


def test_longer_run_of_one_regime(bench, tmp_path, capsys):
    out = tmp_path / 'x3'
    assert bench.main(['--quick', '--dry-run', '--only', 'baseline', '--seeds', '0', '--regimes', 'low',
                       '--epochs-scale', '3', '--output', str(out), '--data-dir', str(tmp_path / 'data')]) == 0
    commands = [line.split() for line in capsys.readouterr().out.splitlines() if not line.startswith('#')]
    assert len(commands) == 1 and flag_value(commands[0], '--experiment') == 'low-baseline-s0'
    assert int(flag_value(commands[0], '--epochs')) == 3 * quick_profile(bench)['regimes']['low']['epochs']
    with pytest.raises(SystemExit, match='unknown regime'):
        bench.main(['--quick', '--dry-run', '--regimes', 'huge', '--output', str(out)])


def test_plan_covers_every_method_and_seed(bench, tmp_path):
    profile = quick_profile(bench)
    plan = bench.build_plan(profile, bench.METHODS, [0, 1, 2], tmp_path / 'runs', tmp_path / 'data')
    regimes = list(profile['regimes'])
    assert len(plan) == len(regimes) * (1 + 3 * len(bench.METHODS))
    assert len({r.name for r in plan}) == len(plan)
    by_name = {r.name: r for r in plan}
    # finetune_plain and finetune_gpd differ in --gpd only
    plain, gpd = by_name['full-finetune_plain-s1'].args, by_name['full-finetune_gpd-s1'].args
    assert {k: v for k, v in gpd.items() if not k.startswith('gpd')} == plain
    # the static teacher trains epochs_scale times longer than its regime's students
    for regime in regimes:
        assert by_name[f'{regime}-teacher'].epochs == 5 * profile['regimes'][regime]['epochs']
    # the lr control differs from the baseline in its lr only: ratio**2 times it
    base, control = by_name['low-baseline-s2'].args, by_name['low-baseline_r2lr-s2'].args
    assert control['lr'] == pytest.approx(4 * base['lr'])
    assert {k: v for k, v in control.items() if k != 'lr'} == {k: v for k, v in base.items() if k != 'lr'}
    # each run's inputs are made by an earlier run
    position = {r.name: i for i, r in enumerate(plan)}
    assert all(position[n] < position[r.name] for r in plan for n in r.needs)


def test_finished_runs_are_skipped_and_changed_arguments_refused(bench, tmp_path):
    profile = quick_profile(bench)
    runs = tmp_path / 'runs'
    run = bench.build_plan(profile, ['baseline'], [0], runs, tmp_path / 'data')[0]
    run_dir = runs / run.name
    assert bench.run_state(run, runs) == 'new'
    write_run(run_dir, [50.0] * run.epochs, args=run.args)
    assert bench.run_state(run, runs) == 'finished'
    (run_dir / 'student.safetensors').unlink()
    assert bench.run_state(run, runs) == 'stale'  # no last.pth to resume from
    (run_dir / 'last.pth').touch()
    assert bench.run_state(run, runs) == 'resume'
    with pytest.raises(SystemExit, match='lr'):
        bench.run_state(bench.Run(run.name, run.regime, run.method, run.seed, {**run.args, 'lr': 1.0}), runs)


# ---------------------------------------------------------------- collection

def write_run(run_dir, top1, dt_top1=None, args=None, epoch_time=30.0):
    """ A finished train.py run dir: summary.csv, args.yaml and an (empty) exported student. """
    run_dir.mkdir(parents=True)
    with open(run_dir / 'summary.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['epoch', 'eval_top1', 'eval_dt_top1', 'epoch_time'])
        writer.writeheader()
        for i, t in enumerate(top1):
            writer.writerow({'epoch': i, 'eval_top1': t, 'eval_dt_top1': '' if dt_top1 is None else dt_top1[i],
                             'epoch_time': epoch_time})
    (run_dir / 'args.yaml').write_text(yaml.safe_dump(args or {'epochs': len(top1)}))
    (run_dir / 'student.safetensors').touch()


@pytest.fixture
def results_dir(tmp_path):
    runs = tmp_path / 'runs'
    write_run(runs / 'full-teacher', [80.0, 90.0], epoch_time=60.0)
    for seed, curve in enumerate([[60.0, 70.0], [62.0, 74.0], [58.0, 72.0]]):
        write_run(runs / f'full-baseline-s{seed}', curve)
    for seed, curve in enumerate([[65.0, 75.0], [63.0, 77.0]]):
        write_run(runs / f'full-kd-s{seed}', curve)
    write_run(runs / 'full-gpd_scratch-s0', [70.0, 69.0], dt_top1=[72.0, 75.0])
    write_run(runs / 'full-finetune_gpd-s0', [75.0], dt_top1=[76.0])
    write_run(runs / 'low-baseline-s0', [40.0, 45.0, 50.0])
    # an interrupted run: in the folder, not in the table
    write_run(runs / 'low-gpd_scratch-s0', [30.0], args={'epochs': 3})
    return tmp_path


def test_aggregate_mean_std(bench, results_dir):
    results, unfinished = bench.load_results(results_dir / 'runs', ['full', 'low'])
    assert unfinished == ['low-gpd_scratch-s0']
    rows = {(r['regime'], r['method']): r for r in bench.aggregate(results, ['full', 'low'])}
    assert list(rows) == [('full', 'teacher'), ('full', 'baseline'), ('full', 'kd'), ('full', 'gpd_scratch'),
                          ('full', 'finetune_gpd'), ('low', 'baseline')]

    base = rows[('full', 'baseline')]
    assert base['seeds'] == 3
    assert base['final_top1_mean'] == pytest.approx(72.0)
    assert base['final_top1_std'] == pytest.approx(2.0)  # sample std of 70, 74, 72
    assert base['best_top1_mean'] == pytest.approx(72.0)
    assert base['train_minutes_mean'] == pytest.approx(1.0)

    kd = rows[('full', 'kd')]
    assert kd['final_top1_mean'] == pytest.approx(76.0)
    assert kd['final_top1_std'] == pytest.approx(statistics.stdev([75.0, 77.0]))

    gpd = rows[('full', 'gpd_scratch')]
    assert gpd['final_top1_mean'] == 69.0 and gpd['best_top1_mean'] == 70.0  # best != final
    assert math.isnan(gpd['final_top1_std'])  # one seed: no spread to report
    assert rows[('full', 'teacher')]['final_top1_mean'] == 90.0


def test_paired_differences(bench, results_dir):
    results, _ = bench.load_results(results_dir / 'runs', ['full', 'low'])
    rows = {(r['regime'], r['better'], r['worse']): r for r in bench.paired_differences(results, ['full', 'low'])}
    # only claims with both methods run on a common seed; the teacher has no seed
    assert set(rows) == {('full', 'kd', 'baseline'), ('full', 'gpd_scratch', 'baseline')}
    kd = rows[('full', 'kd', 'baseline')]  # seeds 0 and 1: 75 - 70, 77 - 74
    assert kd['seeds'] == 2 and kd['per_seed'] == '+5.0 +3.0' and kd['positive'] == 2
    assert kd['diff_mean'] == pytest.approx(4.0) and kd['diff_std'] == pytest.approx(statistics.stdev([5.0, 3.0]))
    gpd = rows[('full', 'gpd_scratch', 'baseline')]  # seed 0 only: 69 - 70
    assert gpd['per_seed'] == '-1.0' and gpd['positive'] == 0 and math.isnan(gpd['diff_std'])


def test_collect_writes_tables_and_plots(bench, results_dir):
    pytest.importorskip('matplotlib')
    assert bench.collect(results_dir, 'quick', ['full', 'low'])
    with open(results_dir / 'accuracy.csv', newline='') as f:
        table = {(r['regime'], r['method']): r for r in csv.DictReader(f)}
    assert float(table[('full', 'baseline')]['final_top1_std']) == pytest.approx(2.0)
    markdown = (results_dir / 'accuracy.md').read_text()
    assert '| full | baseline | 3 | 72.00 ± 2.00 | 72.00 ± 2.00 |' in markdown
    assert '| full | gpd_scratch | 1 | 69.00 | 70.00 |' in markdown
    with open(results_dir / 'runs.csv', newline='') as f:
        assert len(list(csv.DictReader(f))) == 9
    assert '| full | KD > baseline (`kd` - `baseline`) | 4.00 ± 1.41 | 2/2 | +5.0 +3.0 |' in \
        (results_dir / 'comparisons.md').read_text()
    for name in ('top1_per_epoch.png', 'gap_per_epoch.png'):
        png = results_dir / name
        assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_gap_series(bench, results_dir):
    results, _ = bench.load_results(results_dir / 'runs', ['full', 'low'])
    settings = bench.load_settings()
    by = {(r.method, r.seed): r for r in results if r.regime == 'full'}
    teacher = {'full': 90.0}
    assert bench.gap_series(by[('gpd_scratch', 0)], settings['gpd_scratch'], teacher) == ([2.0, 6.0], 'DT - student')
    assert bench.gap_series(by[('kd', 1)], settings['kd'], teacher) == ([27.0, 13.0], 'static - student')
    assert bench.gap_series(by[('baseline', 0)], settings['baseline'], teacher) is None
    # the fine-tune is drawn after the baseline's epochs
    assert bench.epoch_offset(results, 'full', settings['finetune_gpd']) == 2
