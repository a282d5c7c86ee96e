""" benchmarks/gap_probe.py: the student's and the DT's gradients on the shared weights. """
import json

import pytest


@pytest.fixture(scope='module')
def gap_probe(load_script):
    return load_script('benchmarks/gap_probe.py', 'gap_probe')


def probe_lines(gap_probe, root, out, *extra):
    assert gap_probe.main(['--model', 'test_resnet', '--data-dir', str(root), '--batch-size', '8', '--steps', '2',
                           '--every', '2', '--probe-batches', '1', '--threads', '1', '--results-file', str(out),
                           *extra]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_probe_measures_how_hard_sharing_scales_the_students_gradient(gap_probe, fashion_mnist_root, tmp_path):
    published = probe_lines(gap_probe, fashion_mnist_root, tmp_path / 'published.jsonl')
    decoupled = probe_lines(gap_probe, fashion_mnist_root, tmp_path / 'decoupled.jsonl', '--decouple-student')
    assert [r['step'] for r in published] == [0, 2]
    first, first_dec = published[0], decoupled[0]
    # at construction the DT computes the student's function: the two losses pull the shared
    # weights the same way, and the DT term (KL to an identical DT) is zero
    assert first['cos'] > 0.9 and first['dt_loss'] == pytest.approx(first['s_loss'], rel=1e-4)
    # the student's gradient reaches the DT's primary block ratio (unscaled views) to ratio**2
    # (scaled views) times the DT's own; decoupling divides the scaled ones by ratio**2
    assert 2.0 * 0.9 < first['s_dt_norm'] < 4.0 * 1.1
    assert first_dec['s_dt_norm'] < first['s_dt_norm'] / 1.5
    assert 0 < first['primary_fraction'] < 0.5  # the DT's primary block: about 1 / ratio**2 of it


def test_probe_starts_from_a_train_py_gpd_checkpoint(gap_probe, fashion_mnist_root, tmp_path, capsys):
    import timm
    import torch
    from hub_helpers import write_run
    from timm_gpd.reparam import GPDModel

    torch.manual_seed(0)
    model = GPDModel(timm.create_model('test_resnet', num_classes=10, in_chans=1), ratio=2.0, seed=0)
    with torch.no_grad():  # a trained DT no longer computes its student's function
        for p in model.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    args = dict(num_classes=10, in_chans=1, img_size=32)
    last = write_run(tmp_path / 'run', model, 'test_resnet', gpd=dict(ratio=2.0, cbr=True, seed=0), args=args)
    out = tmp_path / 'probe.jsonl'
    assert gap_probe.main(['--checkpoint', str(last), '--data-dir', str(fashion_mnist_root), '--batch-size', '8',
                           '--steps', '0', '--probe-batches', '1', '--threads', '1', '--results-file', str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row['model'] == 'test_resnet' and row['dt_loss'] != pytest.approx(row['s_ce'], rel=1e-3)

    plain = tmp_path / 'plain'
    stock = write_run(plain, timm.create_model('test_resnet', num_classes=10, in_chans=1), 'test_resnet', args=args)
    assert gap_probe.main(['--checkpoint', str(stock), '--data-dir', str(fashion_mnist_root), '--steps', '0']) == 2
    assert 'not a GPD checkpoint' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gap_probe.main(['--data-dir', str(tmp_path / 'nowhere')])
    assert 'no Fashion-MNIST under --data-dir' in capsys.readouterr().err
