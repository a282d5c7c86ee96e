""" benchmarks/function_speed.py: how far one SGD step moves each GPD network's function. """
import timm
import torch
import pytest

import timm_gpd
from hub_helpers import assert_bad_checkpoint_is_one_line, GPD_ARCH, shared_train_run


@pytest.fixture(scope='module')
def function_speed(load_script):
    return load_script('benchmarks/function_speed.py', 'function_speed')


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def test_the_decoupled_student_steps_as_a_student_alone(function_speed):
    """ Without CBR the decoupled student's step is the plain student's (its gradient reaches its view
    unscaled); the published coupling moves it further, as hard sharing multiplies its dense
    weights' step by up to ratio**2. """
    torch.manual_seed(0)
    model = timm_gpd.GPDModel(timm.create_model(GPD_ARCH, num_classes=10, in_chans=1), ratio=2.0, cbr=False,
                              seed=0)
    probe = batches(1, seed=1)[0][0]
    result = function_speed.measure(model, batches(2), probe, lr=1e-4)
    assert result['decoupled'] == pytest.approx(1.0, abs=0.01)
    assert 1.1 < result['student'] < 4.0
    assert result['dt'] > 0


def test_a_checkpoint_and_bad_input(function_speed, tmp_path_factory, fashion_mnist_root, subprocess_env,
                                    tmp_path, capsys):
    checkpoint = shared_train_run(tmp_path_factory, fashion_mnist_root, subprocess_env)
    out = tmp_path / 'speed.json'
    assert function_speed.main(['--data-dir', str(fashion_mnist_root), '--checkpoint', str(checkpoint),
                                '--batch-size', '8', '--batches', '1', '--results-file', str(out)]) == 0
    printed = capsys.readouterr().out
    assert f'{GPD_ARCH} ratio 2.0 from {checkpoint}' in printed and 'decoupled' in printed
    assert set(('dt', 'student', 'decoupled')) <= set(__import__('json').loads(out.read_text()))
    assert_bad_checkpoint_is_one_line(function_speed.main, tmp_path, capsys, '--data-dir', str(fashion_mnist_root))
