"""validate.py on stock models, extracted students, GPD checkpoints and real train.py runs."""
import csv
import json

import pytest
import torch

import validate
from hfhub import cache as hub_cache
from hfhub.publish import publish
from hub_helpers import (GPD_ARCH, TRAIN_VAL_LIMIT, make_stock_run, offline_hub, read_summary,
                         shared_gpd_run, shared_train_run)

LIMIT = 128  # images per evaluation: enough for differing preprocessing or weights to show in the loss


def run_validate(data_root, results_file, *args):
    rc = validate.main([
        '--data-dir', str(data_root), '--dataset', 'torch/fashion_mnist', '--limit', str(LIMIT), '-b', '64',
        '-j', '0', '--results-file', str(results_file), *args])
    assert rc == 0, f'validate.py exited with {rc}'
    return json.loads(results_file.read_text())


def assert_same_eval(a, b):
    assert a['num_images'] == b['num_images'] == LIMIT
    assert (a['top1'], a['top5']) == (b['top1'], b['top5'])
    assert a['loss'] == pytest.approx(b['loss'], abs=2e-4)


@pytest.fixture(scope='module')
def stock_run(tmp_path_factory):
    return make_stock_run(tmp_path_factory.mktemp('run') / 'exp')


@pytest.fixture(scope='module')
def stock_published(stock_run, tmp_path_factory):
    return publish(stock_run, 'gpd-test/resnet18.gpd_fmnist', dry_run=tmp_path_factory.mktemp('pub') / 'out')


def test_checkpoint_and_extracted_student_agree(fashion_mnist_root, stock_run, stock_published, tmp_path):
    from_ckpt = run_validate(fashion_mnist_root, tmp_path / 'a.json', '--checkpoint', str(stock_run))
    from_folder = run_validate(fashion_mnist_root, tmp_path / 'b.json', '--checkpoint', str(stock_published))
    from_file = run_validate(fashion_mnist_root, tmp_path / 'c.json',
                             '--checkpoint', str(stock_published / 'model.safetensors'))
    from_local_dir = run_validate(fashion_mnist_root, tmp_path / 'd.json',
                                  '--model', f'local-dir:{stock_published}', '--pretrained')
    for other in (from_folder, from_file, from_local_dir):
        assert_same_eval(from_ckpt, other)
    assert from_ckpt['input_size'] == '1x32x32'


def test_preprocessing_and_weights_matter(fashion_mnist_root, stock_run, tmp_path):
    """Guards the agreement test above: other normalization, or other weights, change the numbers."""
    base = run_validate(fashion_mnist_root, tmp_path / 'a.json', '--checkpoint', str(stock_run))
    shifted = run_validate(fashion_mnist_root, tmp_path / 'b.json', '--checkpoint', str(stock_run), '--mean', '0.6')
    fresh = run_validate(fashion_mnist_root, tmp_path / 'c.json', '--model', 'resnet18',
                         '--num-classes', '10', '--in-chans', '1', '--img-size', '32')
    assert shifted['loss'] != pytest.approx(base['loss'], abs=2e-4)
    assert fresh['loss'] != pytest.approx(base['loss'], abs=2e-4)


def test_hub_model_offline(fashion_mnist_root, stock_run, stock_published, tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path / 'hf_home')
    hub_cache.place_in_cache(stock_published, 'gpd-test/resnet18.gpd_fmnist')
    from_hub = run_validate(fashion_mnist_root, tmp_path / 'a.json',
                            '--model', 'hf-hub:gpd-test/resnet18.gpd_fmnist', '--pretrained')
    from_ckpt = run_validate(fashion_mnist_root, tmp_path / 'b.json', '--checkpoint', str(stock_run))
    assert_same_eval(from_hub, from_ckpt)


def test_results_file_csv_matches_json(fashion_mnist_root, stock_run, tmp_path):
    as_json = run_validate(fashion_mnist_root, tmp_path / 'r.json', '--checkpoint', str(stock_run))
    validate.main(['--data-dir', str(fashion_mnist_root), '--dataset', 'torch/fashion_mnist', '--limit', str(LIMIT),
                   '-b', '64', '-j', '0', '--checkpoint', str(stock_run), '--results-file', str(tmp_path / 'r.csv')])
    with open(tmp_path / 'r.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and set(rows[0]) == set(as_json)
    assert float(rows[0]['top1']) == as_json['top1'] and int(rows[0]['num_images']) == LIMIT
    assert as_json['img_per_sec'] > 0


@pytest.mark.parametrize('extra, message', [
    (['--checkpoint', 'MISSING'], 'Checkpoint not found'),
    (['--checkpoint', 'CKPT', '--num-classes', '5'], '--num-classes 5 does not match'),
    (['--checkpoint', 'CKPT', '--gpd-teacher'], '--gpd-teacher needs a GPD model'),
    (['--model', 'resnet18', '--num-classes', '5', '--in-chans', '1', '--img-size', '32'], 'Dataset has 10 classes'),
    (['--checkpoint', 'CORRUPT_SAFETENSORS'], 'is truncated or not a safetensors file'),
    (['--model', 'hf-hub:gpd-test/never-published', '--pretrained'], 'python -m hfhub.cache'),
    (['--model', 'hf-hub:gpd-test/never-published', '--img-size', '32'], 'gpd-test/never-published'),
    ([], 'Give --model NAME'),
])
def test_bad_input_gives_clear_error(fashion_mnist_root, stock_run, stock_published, tmp_path, monkeypatch, caplog,
                                     extra, message):
    offline_hub(monkeypatch, tmp_path / 'hf_home')
    corrupt = tmp_path / 'student'
    corrupt.mkdir()
    (corrupt / 'config.json').write_bytes((stock_published / 'config.json').read_bytes())
    (corrupt / 'model.safetensors').write_bytes(b'\x00' * 64)
    paths = dict(MISSING=str(tmp_path / 'missing.pth'), CKPT=str(stock_run),
                 CORRUPT_SAFETENSORS=str(corrupt / 'model.safetensors'))
    rc = validate.main(['--data-dir', str(fashion_mnist_root), '--dataset', 'torch/fashion_mnist', '--limit', '8',
                        '-j', '0', *[paths.get(a, a) for a in extra]])
    assert rc == 2
    assert message in caplog.text


def test_gpd_checkpoint_student_and_teacher(fashion_mnist_root, tmp_path_factory, tmp_path):
    run = shared_gpd_run(tmp_path_factory)
    # move only DT weights the student does not read (its second copy of each input channel) so the
    # two paths differ: the student view is the first block, scaled by the copy count
    checkpoint = torch.load(run, weights_only=True)
    fc = checkpoint['state_dict']['teacher.fc.weight']
    fc[:, fc.shape[1] // 2:] += 0.5 * torch.randn(fc.shape[0], fc.shape[1] // 2, generator=torch.Generator().manual_seed(0))
    perturbed = run.parent.parent / 'perturbed.pth'
    torch.save(checkpoint, perturbed)

    student = run_validate(fashion_mnist_root, tmp_path / 'a.json', '--checkpoint', str(perturbed))
    teacher = run_validate(fashion_mnist_root, tmp_path / 'b.json', '--checkpoint', str(perturbed), '--gpd-teacher')
    published = publish(perturbed, f'gpd-test/{GPD_ARCH}.gpd_fmnist', dry_run=tmp_path / 'pub')
    extracted = run_validate(fashion_mnist_root, tmp_path / 'c.json', '--checkpoint', str(published))
    assert (student['evaluated'], teacher['evaluated']) == ('gpd_student', 'dynamic_teacher')
    assert_same_eval(student, extracted)
    assert teacher['loss'] != pytest.approx(student['loss'], abs=2e-4)


def test_gpd_entrypoint_teacher_equals_student_at_init(fashion_mnist_root):
    """A fresh gpd_* model by name: its DT is built to compute the student's function exactly."""
    args = validate._parser().parse_args([
        '--data-dir', str(fashion_mnist_root), '--dataset', 'torch/fashion_mnist', '--limit', str(LIMIT),
        '-b', '64', '-j', '0', '--model', 'gpd_mobilenetv1_100', '--num-classes', '10', '--in-chans', '1',
        '--img-size', '32'])
    model, data_args = validate.load_eval_model(args)  # built once: building a GPDModel takes a while
    assert validate.is_gpd_model(model)
    data_config = validate.data_config_from_args(validate._input_model(model), dict(data_args, img_size=32))
    assert data_config['input_size'] == (1, 32, 32)
    loader = validate.create_eval_loader(args, data_config)
    student = validate.evaluate(model, loader, torch.device('cpu'))
    teacher = validate.evaluate(model, loader, torch.device('cpu'), forward_kwargs=dict(mode='teacher'))
    assert (student['top1'], student['top5']) == (teacher['top1'], teacher['top5'])
    assert teacher['loss'] == pytest.approx(student['loss'], abs=1e-4)


def test_train_run_metrics_are_reproduced(fashion_mnist_root, subprocess_env, tmp_path_factory, tmp_path):
    """validate.py on a real train.py run reports what train.py logged for its last epoch."""
    ckpt = shared_train_run(tmp_path_factory, fashion_mnist_root, subprocess_env)
    logged = read_summary(ckpt.parent)[-1]
    common = ['--data-dir', str(fashion_mnist_root), '--dataset', 'torch/fashion_mnist', '-b', '16', '-j', '0',
              '--limit', str(TRAIN_VAL_LIMIT)]

    def top1(name, *args):
        results_file = tmp_path / f'{name}.json'
        assert validate.main([*common, '--results-file', str(results_file), *args]) == 0
        return json.loads(results_file.read_text())['top1']

    assert top1('student', '--checkpoint', str(ckpt)) == pytest.approx(logged['eval_top1'], abs=1e-3)
    assert top1('teacher', '--checkpoint', str(ckpt), '--gpd-teacher') == pytest.approx(logged['eval_dt_top1'], abs=1e-3)
    assert top1('ema', '--checkpoint', str(ckpt), '--use-ema') == pytest.approx(logged['eval_ema_top1'], abs=1e-3)
    # train.py exports the EMA student as a stock model
    assert top1('exported', '--checkpoint', str(ckpt.parent / 'student.safetensors')) == pytest.approx(
        logged['eval_ema_top1'], abs=1e-3)
