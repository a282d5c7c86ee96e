""" benchmarks/bn_check.py: a checkpoint's student and DT under each set of BatchNorm statistics. """
import subprocess
import sys

import pytest

from hub_helpers import assert_bad_checkpoint_is_one_line, GPD_ARCH, read_summary


@pytest.fixture(scope='module')
def bn_check(load_script):
    return load_script('benchmarks/bn_check.py', 'bn_check')


def test_stored_statistics_reproduce_the_runs_own_validation(bn_check, repo_root, fashion_mnist_root,
                                                             subprocess_env, tmp_path, capsys):
    """ A real GPD run with a held-out validation tail and --precise-bn: the checkpoint's stored
    statistics and train.py's recompute give exactly the top-1 its summary logged, for the student
    and the DT; the other two sets are measured too. """
    out = tmp_path / 'out'
    cmd = [sys.executable, 'train.py', '--data-dir', str(fashion_mnist_root), '--dataset', 'torch/fashion_mnist',
           '--model', GPD_ARCH, '--in-chans', '1', '--img-size', '32', '--train-limit', '64', '--val-holdout', '48',
           '--precise-bn', '2', '-b', '16', '--epochs', '1', '--warmup-epochs', '0', '--lr', '0.05', '--workers', '0',
           '--gpd', '--output', str(out), '--experiment', 'gpd']
    proc = subprocess.run(cmd, cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = read_summary(out / 'gpd')[-1]
    rows = bn_check.check(str(out / 'gpd' / 'last.pth'), None, batches=2, limit=None, batch_size=None, seed=0)
    assert list(rows) == ['stored', 'precise (eval)', 'precise (train)', 'batch stats']
    for name in ('stored', 'precise (eval)'):
        assert rows[name]['student'] == pytest.approx(logged['eval_top1'])
        assert rows[name]['dt'] == pytest.approx(logged['eval_dt_top1'])
    assert all(0 <= v <= 100 for row in rows.values() for v in row.values())
    results = tmp_path / 'bn.json'
    assert bn_check.main(['--checkpoint', str(out / 'gpd' / 'last.pth'), '--batches', '1', '--limit', '16',
                          '--results-file', str(results)]) == 0
    printed = capsys.readouterr().out
    assert 'batch stats' in printed and '"precise (train)"' in results.read_text()


def test_a_bad_checkpoint_is_one_line(bn_check, tmp_path, capsys):
    assert_bad_checkpoint_is_one_line(bn_check.main, tmp_path, capsys)
