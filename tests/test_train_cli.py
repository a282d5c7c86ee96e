""" End-to-end tests of train.py on a small real Fashion-MNIST subset (CPU, fp32).

The runs use timm's tiny `test_resnet` at 32 px so the whole file stays within a
few minutes on two cores; resnet18 goes through exactly the same code.
"""
import argparse
import csv
import json
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch

import timm
from timm.data import create_transform, resolve_data_config
from torchvision.datasets import FashionMNIST

MODEL = 'test_resnet'
VAL_LIMIT = 32
SUMMARY_COLUMNS = [
    'epoch', 'lr', 'train_loss', 'train_student_ce', 'train_student_kd', 'train_student_dt', 'train_dt_ce',
    'train_dt_kd', 'eval_loss', 'eval_top1', 'eval_top5', 'eval_dt_top1', 'eval_dt_top5', 'eval_ema_top1',
    'eval_ema_top5', 'eval_gap_top1', 'test_loss', 'test_top1', 'test_top5', 'test_dt_top1', 'test_dt_top5',
    'test_ema_top1', 'test_ema_top5', 'test_gap_top1', 'epoch_time',
]
CHECKPOINT_KEYS = {
    'format', 'version', 'epoch', 'arch', 'args', 'state_dict', 'optimizer', 'scheduler', 'rng', 'metric',
    'num_classes', 'in_chans', 'img_size',
}
GPD_KWARGS = {'ratio', 'cbr', 'cbr_only', 'cbr_init', 'noise', 'seed', 'decouple_student'}


def train_args(data_root, output, experiment, *extra, epochs=1):
    return [
        '--data-dir', str(data_root), '--dataset', 'torch/fashion_mnist', '--model', MODEL,
        '--in-chans', '1', '--img-size', '32', '--train-limit', '64', '--val-limit', str(VAL_LIMIT),
        '-b', '16', '--epochs', str(epochs), '--warmup-epochs', '0', '--lr', '0.05', '--workers', '0',
        '--seed', '0', '--log-interval', '4', '--output', str(output), '--experiment', experiment, *extra,
    ]


def run_train(repo_root, env, args, check=True):
    proc = subprocess.run([sys.executable, 'train.py', *args], cwd=repo_root, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        pytest.fail(f'train.py exited with {proc.returncode}:\n{proc.stderr[-4000:]}')
    return proc


def read_rows(run_dir):
    with open(run_dir / 'summary.csv', newline='') as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def load_checkpoint(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def exported_student(run_dir):
    """ student.safetensors in a stock timm model, and its eval transform from config.json only. """
    with open(run_dir / 'config.json') as f:
        cfg = json.load(f)
    model = timm.create_model(cfg['architecture'], **cfg['model_args'])
    model.load_state_dict(safetensors.torch.load_file(run_dir / 'student.safetensors'), strict=True)
    return model.eval(), create_transform(**resolve_data_config(pretrained_cfg=cfg['pretrained_cfg']))


def stock_top1(model, dataset, indices):
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=256)
    correct = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(-1) == y).sum().item()
    return 100. * correct / len(indices)


def exported_student_top1(run_dir, data_root):
    """ Top-1 (%) of student.safetensors on the validated test images, preprocessing from config.json only. """
    model, transform = exported_student(run_dir)
    return stock_top1(model, FashionMNIST(str(data_root), train=False, transform=transform), range(VAL_LIMIT))


def assert_states_equal(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f'{what}: {k} differs'


def assert_same_training(run_a, run_b):
    """ Two runs ended with identical weights, EMA, optimizer state and logged metrics. """
    ca, cb = load_checkpoint(run_a / 'last.pth'), load_checkpoint(run_b / 'last.pth')
    assert ca['epoch'] == cb['epoch']
    assert_states_equal(ca['state_dict'], cb['state_dict'], 'state_dict')
    if 'state_dict_ema' in ca:
        assert_states_equal(ca['state_dict_ema'], cb['state_dict_ema'], 'state_dict_ema')
    assert ca['optimizer']['state'].keys() == cb['optimizer']['state'].keys()
    for i, sa in ca['optimizer']['state'].items():
        assert_states_equal(sa, cb['optimizer']['state'][i], f'optimizer state {i}')
    rows_a, rows_b = read_rows(run_a)[1], read_rows(run_b)[1]
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b):
        ra.pop('epoch_time'), rb.pop('epoch_time')
        assert ra == rb


@pytest.fixture(scope='module')
def output_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('train_output')


@pytest.fixture(scope='module')
def plain_run(repo_root, subprocess_env, fashion_mnist_root, output_dir):
    """ The plain baseline; its weights serve as static teacher and as fine-tune start. """
    run_train(repo_root, subprocess_env, train_args(fashion_mnist_root, output_dir, 'plain'))
    return output_dir / 'plain'


@pytest.fixture(scope='module')
def scratch_run(repo_root, subprocess_env, fashion_mnist_root, output_dir):
    """ GPD from scratch, two epochs, with an EMA student: the reference for the resume tests. """
    args = train_args(fashion_mnist_root, output_dir, 'scratch', '--gpd', '--model-ema', '--model-ema-decay', '0.9',
                      epochs=2)
    run_train(repo_root, subprocess_env, args)
    return output_dir / 'scratch'


def test_plain_baseline(plain_run, fashion_mnist_root):
    columns, rows = read_rows(plain_run)
    assert columns == SUMMARY_COLUMNS
    assert len(rows) == 1
    row = rows[0]
    assert row['train_student_ce'] and row['train_loss'] == row['train_student_ce']
    assert not row['train_student_dt'] and not row['eval_dt_top1'] and not row['eval_gap_top1']

    ckpt = load_checkpoint(plain_run / 'last.pth')
    assert CHECKPOINT_KEYS <= set(ckpt) and 'gpd' not in ckpt
    assert (ckpt['format'], ckpt['version'], ckpt['arch'], ckpt['epoch']) == ('timm-gpd-checkpoint', 1, MODEL, 0)
    assert (ckpt['num_classes'], ckpt['in_chans'], ckpt['img_size']) == (10, 1, 32)
    timm.create_model(MODEL, num_classes=10, in_chans=1).load_state_dict(ckpt['state_dict'], strict=True)
    assert (plain_run / 'args.yaml').exists() and (plain_run / 'model_best.pth').exists()
    assert exported_student_top1(plain_run, fashion_mnist_root) == float(row['eval_top1'])


def test_gpd_scratch(scratch_run, fashion_mnist_root):
    columns, rows = read_rows(scratch_run)
    assert columns == SUMMARY_COLUMNS
    assert [r['epoch'] for r in rows] == ['0', '1']
    for row in rows:
        parts = [float(row[f'train_{p}']) for p in ('student_ce', 'student_dt', 'dt_ce')]
        assert not row['train_student_kd'] and not row['train_dt_kd']  # no static teacher
        assert float(row['train_loss']) == pytest.approx(sum(parts), rel=1e-5)
        assert float(row['eval_gap_top1']) == pytest.approx(float(row['eval_dt_top1']) - float(row['eval_top1']))
        assert row['eval_ema_top1']

    ckpt = load_checkpoint(scratch_run / 'last.pth')
    assert CHECKPOINT_KEYS | {'gpd', 'state_dict_ema'} <= set(ckpt)
    assert set(ckpt['gpd']) == GPD_KWARGS and ckpt['gpd']['cbr_init'] == 'scratch'
    assert all(k.startswith(('teacher.', 'student.')) for k in ckpt['state_dict'])
    assert ckpt['state_dict'].keys() == ckpt['state_dict_ema'].keys()
    # the exported student is the EMA one under --model-ema
    assert exported_student_top1(scratch_run, fashion_mnist_root) == float(rows[-1]['eval_ema_top1'])


def test_gpd_static_teacher(repo_root, subprocess_env, fashion_mnist_root, output_dir, plain_run):
    args = train_args(fashion_mnist_root, output_dir, 'teacher', '--gpd', '--teacher', MODEL,
                      '--teacher-checkpoint', str(plain_run / 'last.pth'), '--kd-loss', 'dkd')
    proc = run_train(repo_root, subprocess_env, args)
    run_dir = output_dir / 'teacher'
    assert 'static teacher test_resnet' in proc.stderr
    row = read_rows(run_dir)[1][-1]
    parts = [float(row[f'train_{p}']) for p in ('student_ce', 'student_kd', 'student_dt', 'dt_ce', 'dt_kd')]
    assert float(row['train_loss']) == pytest.approx(sum(parts), rel=1e-5)
    assert exported_student_top1(run_dir, fashion_mnist_root) == float(row['eval_top1'])


def test_gpd_finetune_from_initial_checkpoint(repo_root, subprocess_env, fashion_mnist_root, output_dir, plain_run):
    args = train_args(fashion_mnist_root, output_dir, 'finetune', '--gpd',
                      '--initial-checkpoint', str(plain_run / 'student.safetensors'))
    run_train(repo_root, subprocess_env, args)
    run_dir = output_dir / 'finetune'
    assert load_checkpoint(run_dir / 'last.pth')['gpd']['cbr_init'] == 'finetune'
    assert exported_student_top1(run_dir, fashion_mnist_root) == float(read_rows(run_dir)[1][-1]['eval_top1'])


def test_gpd_finetune_pretrained_offline(repo_root, subprocess_env, fashion_mnist_root, output_dir, tmp_path):
    # "pretrained" weights placed in a Hugging Face cache layout, as no download is possible
    source = timm.create_model(MODEL)
    repo_dir = tmp_path / 'hub' / ('models--' + source.pretrained_cfg['hf_hub_id'].replace('/', '--'))
    revision = '0' * 40
    (repo_dir / 'snapshots' / revision).mkdir(parents=True)
    (repo_dir / 'refs').mkdir()
    (repo_dir / 'refs' / 'main').write_text(revision)
    safetensors.torch.save_file(source.state_dict(), repo_dir / 'snapshots' / revision / 'model.safetensors')
    env = dict(subprocess_env, HF_HUB_CACHE=str(tmp_path / 'hub'))

    # --lr 0 keeps the weights where fine-tuning starts; bf16 autocast on CPU is slow, two steps exercise --amp
    args = train_args(fashion_mnist_root, output_dir, 'pretrained', '--gpd', '--pretrained', '--amp',
                      '--train-limit', '32', '--lr', '0')
    run_train(repo_root, env, args)
    run_dir = output_dir / 'pretrained'
    ckpt = load_checkpoint(run_dir / 'last.pth')
    assert ckpt['gpd']['cbr_init'] == 'finetune' and ckpt['args']['amp']

    # the extracted student carries the cached weights: CBR fine-tune init and widening changed nothing
    student = safetensors.torch.load_file(run_dir / 'student.safetensors')
    first_conv, head = source.pretrained_cfg['first_conv'], source.pretrained_cfg['classifier']
    for k, v in source.state_dict().items():
        if 'running_' in k or 'num_batches' in k or k.startswith(head):
            continue  # BN statistics follow the data; the 10-class head is new
        expected = v.sum(1, keepdim=True) if k == f'{first_conv}.weight' else v  # timm's RGB -> grayscale stem
        torch.testing.assert_close(student[k], expected, rtol=1e-5, atol=1e-6, msg=k)


def test_resume_equivalence(repo_root, subprocess_env, fashion_mnist_root, output_dir, scratch_run):
    # 1 epoch, then resume with --epochs 2: same as the uninterrupted 2-epoch run, bit for bit
    args = train_args(fashion_mnist_root, output_dir, 'resumed', '--gpd', '--model-ema', '--model-ema-decay', '0.9',
                      epochs=1)
    run_train(repo_root, subprocess_env, args)
    run_dir = output_dir / 'resumed'
    resume = [a for a in args if a not in ('--experiment', 'resumed')]
    resume[resume.index('--epochs') + 1] = '2'
    run_train(repo_root, subprocess_env, resume + ['--resume', str(run_dir / 'last.pth')])
    assert_same_training(scratch_run, run_dir)


def test_kill_mid_epoch_then_resume(repo_root, subprocess_env, fashion_mnist_root, output_dir, scratch_run):
    args = train_args(fashion_mnist_root, output_dir, 'killed', '--gpd', '--model-ema', '--model-ema-decay', '0.9',
                      epochs=2)
    run_dir = output_dir / 'killed'
    proc = subprocess.Popen([sys.executable, 'train.py', *args], cwd=repo_root, env=subprocess_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (run_dir / 'last.pth').exists():
            assert proc.poll() is None, 'the run ended before its first checkpoint'
            assert time.time() < deadline, 'no checkpoint after 300 s'
            time.sleep(0.05)
        assert proc.poll() is None, 'the run finished before it could be killed'
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    assert [r['epoch'] for r in read_rows(run_dir)[1]] == ['0']
    assert not (run_dir / 'student.safetensors').exists()

    run_train(repo_root, subprocess_env, args + ['--resume', str(run_dir / 'last.pth')])
    assert [r['epoch'] for r in read_rows(run_dir)[1]] == ['0', '1']
    assert_same_training(scratch_run, run_dir)


def test_precise_bn_changes_statistics_not_training(repo_root, subprocess_env, fashion_mnist_root, output_dir,
                                                    scratch_run):
    """ --precise-bn recomputes running statistics before each validation; the training itself
    (weights, optimizer state, losses, the random streams of later epochs) is that of the run
    without it. """
    args = train_args(fashion_mnist_root, output_dir, 'precise_bn', '--gpd', '--model-ema', '--model-ema-decay',
                      '0.9', '--precise-bn', '2', epochs=2)
    run_train(repo_root, subprocess_env, args)
    run_dir = output_dir / 'precise_bn'
    ref, new = load_checkpoint(scratch_run / 'last.pth'), load_checkpoint(run_dir / 'last.pth')
    stats = ('running_mean', 'running_var')
    weights = [k for k in ref['state_dict'] if not k.endswith(stats)]
    assert_states_equal({k: ref['state_dict'][k] for k in weights}, {k: new['state_dict'][k] for k in weights},
                        'weights')
    for i, state in ref['optimizer']['state'].items():
        assert_states_equal(state, new['optimizer']['state'][i], f'optimizer state {i}')
    for ra, rb in zip(read_rows(scratch_run)[1], read_rows(run_dir)[1]):
        assert {k: v for k, v in ra.items() if k.startswith('train_')} == \
            {k: v for k, v in rb.items() if k.startswith('train_')}
    recomputed = [k for k in weights + list(ref['state_dict']) if k.endswith(stats)
                  and not torch.equal(ref['state_dict'][k], new['state_dict'][k])]
    assert any(k.startswith('student.') for k in recomputed) and any(k.startswith('teacher.') for k in recomputed)


LAUNCHER = '''
import sys
import torch
import torch.distributed as dist
import train

model = train.main(sys.argv[2:])
torch.save(model.state_dict(), f'{sys.argv[1]}/rank{dist.get_rank()}_of_{dist.get_world_size()}.pth')
'''


def test_accelerate_launch_two_processes(repo_root, subprocess_env, fashion_mnist_root, output_dir, tmp_path):
    launcher = tmp_path / 'launch_train.py'
    launcher.write_text(LAUNCHER)
    # --in-chans 3 also covers grayscale images repeated to RGB
    args = train_args(fashion_mnist_root, output_dir, 'ddp', '--gpd', '--in-chans', '3')
    # `accelerate launch --cpu --num_processes 2` starts a single process unless MPI is set up;
    # torchrun-style launching (--multi_gpu) with ACCELERATE_USE_CPU gives 2 gloo processes
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           str(launcher), str(tmp_path), *args]
    env = dict(subprocess_env, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert '2 process(es)' in proc.stderr
    rank0 = torch.load(tmp_path / 'rank0_of_2.pth', weights_only=True)
    rank1 = torch.load(tmp_path / 'rank1_of_2.pth', weights_only=True)
    # DT and student weights from gradient sync; BN statistics from --dist-bn reduce
    assert_states_equal(rank0, rank1, 'rank 0 vs rank 1')
    ckpt = load_checkpoint(output_dir / 'ddp' / 'last.pth')
    assert ckpt['in_chans'] == 3
    assert_states_equal(rank0, ckpt['state_dict'], 'checkpoint')


# ---------------------------------------------------------------- clear errors

@pytest.fixture(scope='module')
def train_module(load_script):
    return load_script('train.py', 'train')


def test_truncated_checkpoint_cli_error(repo_root, subprocess_env, fashion_mnist_root, output_dir, plain_run,
                                        tmp_path):
    data = (plain_run / 'last.pth').read_bytes()
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(data[:len(data) // 2])
    proc = run_train(repo_root, subprocess_env, train_args(fashion_mnist_root, output_dir, 'x') + [
        '--resume', str(truncated)], check=False)
    assert proc.returncode == 2
    assert 'truncated or not a PyTorch file' in proc.stderr and 'Traceback' not in proc.stderr


@pytest.mark.parametrize('content, message', [
    ({'fc.weight': torch.zeros(2, 2)}, 'not a timm-gpd training checkpoint'),
    ([1, 2, 3], 'not a timm-gpd training checkpoint'),
    ({'format': 'timm-gpd-checkpoint', 'version': 99}, 'version 99'),
    ({'format': 'timm-gpd-checkpoint', 'version': 1, 'epoch': 0}, 'lacks checkpoint keys'),
])
def test_foreign_checkpoint_errors(train_module, fashion_mnist_root, tmp_path, content, message):
    path = tmp_path / 'foreign.pth'
    torch.save(content, path)
    with pytest.raises(train_module.UsageError, match=message):
        train_module.main(train_args(fashion_mnist_root, tmp_path, 'x') + ['--resume', str(path)])


def test_text_file_checkpoint_error(train_module, fashion_mnist_root, tmp_path):
    path = tmp_path / 'notes.pth'
    path.write_text('not a checkpoint')
    with pytest.raises(train_module.UsageError, match='truncated or not a PyTorch file'):
        train_module.main(train_args(fashion_mnist_root, tmp_path, 'x') + ['--resume', str(path)])


def test_unsafe_checkpoint_error(train_module, fashion_mnist_root, tmp_path):
    path = tmp_path / 'pickled.pth'
    # e.g. an argparse.Namespace of args, as some training scripts store: not weights-only loadable
    torch.save({'format': 'timm-gpd-checkpoint', 'args': argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(train_module.UsageError, match='weights_only=True refuses'):
        train_module.main(train_args(fashion_mnist_root, tmp_path, 'x') + ['--resume', str(path)])


def test_resume_with_other_settings_errors(train_module, fashion_mnist_root, tmp_path, plain_run):
    with pytest.raises(train_module.UsageError, match='trained without --gpd'):
        train_module.main(train_args(fashion_mnist_root, tmp_path, 'x', '--gpd') + [
            '--resume', str(plain_run / 'last.pth')])


def test_teacher_class_count_mismatch(train_module, fashion_mnist_root, tmp_path):
    path = tmp_path / 'teacher7.pth'
    torch.save(timm.create_model(MODEL, num_classes=7, in_chans=1).state_dict(), path)
    with pytest.raises(train_module.UsageError, match='has 7 classes but the student has 10'):
        train_module.main(train_args(fashion_mnist_root, tmp_path, 'x', '--teacher', MODEL,
                                     '--teacher-checkpoint', str(path)))


def test_unknown_config_key(train_module, tmp_path, capsys):
    cfg = tmp_path / 'bad.yaml'
    cfg.write_text('model: resnet18\nlearning_rate: 0.1\n')
    with pytest.raises(SystemExit):
        train_module.parse_args(['--config', str(cfg)])
    err = capsys.readouterr().err
    assert 'unknown key(s)' in err and 'learning_rate' in err


def test_negative_precise_bn(train_module, capsys):
    with pytest.raises(SystemExit):
        train_module.parse_args(['--precise-bn', '-1'])
    assert '--precise-bn takes a number of batches >= 0, got -1' in capsys.readouterr().err


def test_config_file_sets_defaults(train_module, tmp_path):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('model: resnet34\nlr: 0.2\ngpd: true\nsched: step\n')
    args = train_module.parse_args(['--config', str(cfg), '--lr', '0.3'])
    # the file sets defaults, the command line still wins; --gpd brings clip 5
    assert (args.model, args.lr, args.gpd, args.sched, args.clip_grad) == ('resnet34', 0.3, True, 'step', 5.0)


# ---------------------------------------------------------------- held-out validation split

def test_val_holdout_splits(train_module, fashion_mnist_root):
    """ --val-holdout: training stops before the held-out tail, which validates; the validation
    split becomes the whole test set. """
    args = train_module.parse_args(train_args(fashion_mnist_root, 'unused', 'x', '--val-holdout', '500')
                                   + ['--train-limit', '100000'])
    train_ds, val_ds = train_module.build_datasets(args)
    data_config = resolve_data_config({'input_size': (1, 32, 32)})
    train_loader, val_loader, test_loader, _ = train_module.build_loaders(args, data_config, train_ds, val_ds)
    assert list(train_loader.dataset.indices) == list(range(60000 - 500))
    assert list(val_loader.dataset.indices) == list(range(60000 - 500, 60000 - 500 + VAL_LIMIT))
    assert val_loader.dataset.dataset.train and not test_loader.dataset.train
    assert len(test_loader.dataset) == 10000
    # the held-out images are read under the eval transforms, training images under the train ones
    assert val_loader.dataset.dataset.transform is not train_loader.dataset.dataset.transform
    for bad, message in (('60000', 'leaves no training image'), ('-1', 'must be >= 0')):
        args.val_holdout = int(bad)
        with pytest.raises(train_module.UsageError, match=message):
            train_module.build_loaders(args, data_config, train_ds, val_ds)


def test_val_holdout_run(train_module, fashion_mnist_root, tmp_path):
    """ A run with --val-holdout validates on the held-out training images, records the test split
    every epoch, and picks model_best by validation, never by test. """
    holdout = 48
    train_module.main(train_args(fashion_mnist_root, tmp_path, 'holdout', '--val-holdout', str(holdout),
                                 '-vb', '500', epochs=2))
    run_dir = tmp_path / 'holdout'
    columns, rows = read_rows(run_dir)
    assert columns == SUMMARY_COLUMNS
    assert all(row['test_top1'] and row['test_loss'] for row in rows)
    model, transform = exported_student(run_dir)
    train_split = FashionMNIST(str(fashion_mnist_root), train=True, transform=transform)
    test_split = FashionMNIST(str(fashion_mnist_root), train=False, transform=transform)
    last = rows[-1]
    assert float(last['eval_top1']) == pytest.approx(stock_top1(
        model, train_split, range(60000 - holdout, 60000 - holdout + VAL_LIMIT)))
    assert float(last['test_top1']) == pytest.approx(stock_top1(model, test_split, range(10000)))
    best = load_checkpoint(run_dir / 'model_best.pth')
    assert best['metric'] == max(float(row['eval_top1']) for row in rows)
