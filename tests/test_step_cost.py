""" benchmarks/step_cost.py end to end on a tiny pair: every timed unit runs, the ratios it prints
are the ratios of the times it measured, and the CPU memory probe sees a step's allocations. """
import json
import os
import re
import subprocess
import sys

import pytest
import torch


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
    """The script runs every unit and the report it prints is the one it writes to the results file."""
    out = tmp_path / 'cost.json'
    cmd = [sys.executable, str(repo_root / 'benchmarks' / 'step_cost.py'), '--pairs', 'resnet10t:resnet10t',
           '--img-size', '32', '--batch-size', '2', '--num-classes', '10', '--repeats', '1', '--warmup', '1',
           '--results-file', str(out)]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '(target <= 1.40)' in proc.stdout  # the goals below 224 px
    result = json.loads(out.read_text())['results'][0]
    t = result['times_s']
    assert set(t) == {'plain', 'kd', 'gpd', 'gpd_nocbr', 'teacher_fwd', 'dt_fwd_bwd', 'student_fwd_bwd', 'optimizer',
                      'floor_together'}
    assert all(v > 0 for v in t.values())
    printed, times = {}, {}
    for line in proc.stdout.splitlines():
        if line.startswith('  plain='):
            times = {k: float(v) / 1e3 for k, v in (f.split('=') for f in line.split())}
        ratio = re.match(r'^  (\S.*?)\s+(-?\d+\.\d{3})(?: \(target <= [\d.]+\))?$', line)
        if ratio:
            printed[ratio.group(1)] = float(ratio.group(2))
    for key in ('gpd/kd', 'gpd/parts', 'gpd_nocbr/floor', 'gpd/floor', 'gpd_nocbr/floor_together',
                'gpd/floor_together', 'mem gpd/floor', 'mem gpd_nocbr/floor', 'extracted/stock inference'):
        assert printed[key] == pytest.approx(result[key], abs=6e-4), key
    assert times.keys() == t.keys()
    for key, value in t.items():
        assert times[key] == pytest.approx(value, abs=6e-5), key
    assert result['peak_bytes']['gpd'] > 0 and result['peak_bytes']['floor_held_together'] > 0


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}


def test_each_timed_unit_does_its_work(step_cost):
    """Each unit the ratios are built from runs the work its name says, on its own models: a
    unit that silently did nothing (or trained another model) would make every ratio wrong."""
    import argparse
    args = argparse.Namespace(num_classes=10, gpd_ratio=2.0, channels_last=False, batch_size=2, img_size=32,
                              amp=False, compile=False)
    device = torch.device('cpu')
    models = step_cost.build('test_resnet:test_resnet', args, device)
    steps, _ = step_cost.make_steps(models, args, device)
    trains = {'plain': 'student', 'kd': 'kd_student', 'gpd': 'gpd', 'gpd_nocbr': 'gpd_nocbr'}
    grads_only = {'dt_fwd_bwd': ('wide',), 'student_fwd_bwd': ('student',), 'floor_together': ('wide', 'student')}
    for name, fn in steps.items():
        before = {k: _params(m) for k, m in models.items()}
        for k, m in models.items():
            if k != 'gpd':  # its gradients are what the 'optimizer' unit steps with, as in the script
                m.zero_grad(set_to_none=True)
        fn()
        changed = {k for k, m in models.items() if _changed(before[k], m)}
        with_grads = {k for k, m in models.items() if k != 'gpd' and any(p.grad is not None for p in m.parameters())}
        if name in trains:
            assert changed == {trains[name]}, name
        elif name == 'optimizer':
            assert changed == {'gpd'}  # the last gpd step left its gradients in place
        else:
            assert changed == set(), name
            assert with_grads == set(grads_only.get(name, ())), name
    assert not any(p.requires_grad for p in models['teacher'].parameters())
