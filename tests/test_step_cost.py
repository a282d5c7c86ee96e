""" benchmarks/step_cost.py end to end on a tiny pair: every timed unit runs, the ratios it prints
are the ratios of the times it measured, and the CPU memory probe sees a step's allocations. """
import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope='module')
def step_cost(load_script):
    return load_script('benchmarks/step_cost.py', 'step_cost_bench')


PROBE = """
import sys, time, torch
sys.path.insert(0, sys.argv[1])
import step_cost
torch.ones(1)  # torch's own start-up allocations stay outside the measured block
with step_cost.PeakMemory(torch.device('cpu')) as pm:
    t = torch.ones(int(sys.argv[2]) // 4)  # touched, so resident
    time.sleep(0.05)
    del t
print(pm.peak)
"""


@pytest.mark.parametrize('nbytes', [256 * 2**10, 16 * 2**20])
def test_peak_memory_sees_an_allocation_under_the_probe_env(step_cost, repo_root, nbytes):
    # the memory numbers come from a fresh process under MEMORY_PROBE_ENV; in a long-lived process
    # (pytest's) freed heap memory is reused and the RSS may not rise at all
    env = dict(os.environ, **step_cost.MEMORY_PROBE_ENV)
    proc = subprocess.run([sys.executable, '-c', PROBE, str(repo_root / 'benchmarks'), str(nbytes)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = int(proc.stdout.split()[-1])
    assert 0.75 * nbytes <= peak <= nbytes + 8 * 2**20


def test_tiny_pair_end_to_end(repo_root, tmp_path):
    out = tmp_path / 'cost.json'
    cmd = [sys.executable, str(repo_root / 'benchmarks' / 'step_cost.py'), '--pairs', 'resnet10t:resnet10t',
           '--img-size', '32', '--batch-size', '2', '--num-classes', '10', '--repeats', '1', '--warmup', '1',
           '--results-file', str(out)]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'gpd/floor' in proc.stdout and '(target <= 1.25)' in proc.stdout
    result = json.loads(out.read_text())['results'][0]
    t = result['times_s']
    assert set(t) == {'plain', 'kd', 'gpd', 'gpd_nocbr', 'teacher_fwd', 'dt_fwd_bwd', 'student_fwd_bwd', 'optimizer',
                      'floor_together'}
    assert all(v > 0 for v in t.values())
    floor = t['teacher_fwd'] + t['dt_fwd_bwd'] + t['student_fwd_bwd']
    assert result['gpd/floor'] == pytest.approx(t['gpd'] / floor)
    assert result['gpd/kd'] == pytest.approx(t['gpd'] / t['kd'])
    assert result['gpd_nocbr/floor_together'] == pytest.approx(t['gpd_nocbr'] / t['floor_together'])
    # the re-run with a pinned mmap threshold makes a training step's allocations visible
    assert result['peak_bytes']['gpd'] > 0 and result['peak_bytes']['floor_held_together'] > 0
    assert result['extracted/stock inference'] > 0
