""" benchmarks/replica_spread.py: how far a DT's replicas, and its features, have moved from its student's. """
import copy
import json

import timm
import torch
import pytest

import timm_gpd
from hub_helpers import assert_bad_checkpoint_is_one_line, GPD_ARCH, read_summary, shared_train_run


@pytest.fixture(scope='module')
def replica_spread(load_script):
    return load_script('benchmarks/replica_spread.py', 'replica_spread')


@pytest.fixture(scope='module')
def fresh_dt():
    torch.manual_seed(0)
    return timm_gpd.GPDModel(timm.create_model(GPD_ARCH, num_classes=10, in_chans=1), ratio=2.0, seed=0).eval()


def batches(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 1, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


def test_a_new_dt_is_its_student_replicated(replica_spread, fresh_dt):
    """ Inverse reparameterization with its zero-sum noise: every replica equal, the average replica
    the student's feature map, the same predictions. """
    result = replica_spread.measure(fresh_dt, batches(), 2, torch.device('cpu'))
    assert result['images'] == 8 and result['agreement'] == 100.0
    assert len(result['layers']) >= 5
    for name, row in result['layers'].items():
        assert row['replica_spread'] < 1e-5, name
        assert row['dt_vs_student'] < 1e-4, name


def test_one_replica_moved_shows_at_its_layer_and_after(replica_spread, fresh_dt):
    """ Shift the second replica of one DT BatchNorm: that layer's spread is what the shift makes it
    (computed by hand), the layers before it stay at zero. """
    model = copy.deepcopy(fresh_dt)
    names = list(replica_spread.norm_layers(model.teacher))
    target = names[len(names) // 2]
    bn = model.teacher.get_submodule(target)
    c = bn.num_features // 2
    with torch.no_grad():
        bn.bias[c:] += 1.0
    outputs = {}
    hook = bn.register_forward_hook(lambda _m, _a, out: outputs.__setitem__('a', out.double()))
    data = batches(1)
    with torch.no_grad():
        model(data[0][0], mode='teacher')
    hook.remove()
    a = outputs['a']
    first, second = a[:, :c], a[:, c:]
    mean = (first + second) / 2
    expected = (((first - mean) ** 2).sum() + ((second - mean) ** 2).sum()) / (first ** 2 + second ** 2).sum()
    rows = replica_spread.measure(model, data, 2, torch.device('cpu'))['layers']
    assert rows[target]['replica_spread'] == pytest.approx(expected.sqrt().item(), rel=1e-6)
    assert rows[target]['replica_spread'] > 0.05
    for name in names[:names.index(target)]:
        assert rows[name]['replica_spread'] < 1e-5, name


def test_a_real_checkpoint_reproduces_its_logged_top1(replica_spread, tmp_path_factory, fashion_mnist_root,
                                                      subprocess_env, capsys, tmp_path):
    """ train.py's own validation loader: the student's and DT's top-1 are the ones its summary logged. """
    checkpoint = shared_train_run(tmp_path_factory, fashion_mnist_root, subprocess_env)
    logged = read_summary(checkpoint.parent)[-1]
    result = replica_spread.spread(str(checkpoint), None, 'val', None, None)
    assert result['top1']['student'] == pytest.approx(logged['eval_top1'])
    assert result['top1']['dt'] == pytest.approx(logged['eval_dt_top1'])
    assert result['ratio'] == 2 and 0 <= result['agreement'] <= 100
    assert any(row['replica_spread'] > 0 for row in result['layers'].values())  # two epochs moved them
    out = tmp_path / 'spread.json'
    assert replica_spread.main(['--checkpoint', str(checkpoint), '--limit', '10', '--results-file', str(out)]) == 0
    printed = capsys.readouterr().out
    assert '10 val images' in printed and 'per stage' in printed and '"replica_spread"' in out.read_text()
    # the run held no test split out
    assert replica_spread.main(['--checkpoint', str(checkpoint), '--split', 'test']) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and 'no test split' in err
    # several checkpoints: a bad one is reported and the others still measured
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint')
    assert replica_spread.main(['--checkpoint', str(bad), str(checkpoint), '--limit', '10',
                                '--results-file', str(out)]) == 2
    captured = capsys.readouterr()
    assert str(bad) in captured.err and '10 val images' in captured.out
    assert [r['checkpoint'] for r in json.loads(out.read_text())] == [str(checkpoint)]


def test_a_bad_checkpoint_is_one_line(replica_spread, tmp_path, capsys):
    assert_bad_checkpoint_is_one_line(replica_spread.main, tmp_path, capsys)
