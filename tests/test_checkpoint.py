"""The checkpoint contract (timm_gpd.checkpoint) and what train.py does with it: atomic writes that
leave no temporary file, one-line errors for bad files from every entry point, divergence that
stops a run without losing its last good checkpoint, and the early, clear refusals of bad settings."""
import os
import signal
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch

from timm_gpd import checkpoint as ckpt_lib
from timm_gpd.checkpoint import CheckpointError, NonFiniteWeightsError

from hub_helpers import bad_torch_files, write_bad_files

MODEL = 'test_resnet'


def _bad_files(tmp_path):
    """name -> (path, what the error must say): every kind of bad file a user may pass."""
    good = {'fc.weight': torch.zeros(2, 2)}
    torch.save(good, tmp_path / 'good.pth')
    data = (tmp_path / 'good.pth').read_bytes()
    safetensors.torch.save_file(good, str(tmp_path / 'good.safetensors'))
    st_data = (tmp_path / 'good.safetensors').read_bytes()
    contents = {
        **bad_torch_files(data),
        'missing.safetensors': (None, 'does not exist'),
        'empty.safetensors': (b'', 'is empty'),
        'random.safetensors': (bytes(range(256)) * 16, 'is truncated or not a safetensors file'),
        'truncated.safetensors': (st_data[:len(st_data) // 2], 'is truncated or not a safetensors file'),
    }
    return write_bad_files(tmp_path, contents)


def test_read_weights_errors_are_one_line_and_name_the_file(tmp_path):
    for name, (path, message) in _bad_files(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            ckpt_lib.read_weights(path, 'teacher checkpoint')
        text = str(info.value)
        assert text.startswith(f'teacher checkpoint {path} ') and message in text, (name, text)
        assert '\n' not in text, name
    assert ckpt_lib.read_weights(tmp_path / 'good.safetensors').keys() == {'fc.weight'}


def test_load_checkpoint_checks_format_version_and_keys(tmp_path):
    path = tmp_path / 'c.pth'
    for content, message in [({'fc.weight': torch.zeros(1)}, 'not a timm-gpd checkpoint'),
                             ({'format': ckpt_lib.CHECKPOINT_FORMAT, 'version': 99}, 'version 99'),
                             ({'format': ckpt_lib.CHECKPOINT_FORMAT, 'version': 1}, 'lacks checkpoint keys')]:
        torch.save(content, path)
        with pytest.raises(CheckpointError, match=message):
            ckpt_lib.load_checkpoint(path, hint='HINT')
    torch.save({'format': ckpt_lib.CHECKPOINT_FORMAT, 'version': 1, 'arch': 'x', 'state_dict': {},
                'num_classes': 2, 'in_chans': 3}, path)
    assert ckpt_lib.load_checkpoint(path)['arch'] == 'x'  # enough to rebuild a model
    with pytest.raises(CheckpointError, match='lacks checkpoint keys: epoch, args'):
        ckpt_lib.load_checkpoint(path, training=True)  # not enough to resume


def test_save_atomic_keeps_the_old_file_and_no_tmp_on_error(tmp_path, monkeypatch):
    path = tmp_path / 'last.pth'
    ckpt_lib.save_atomic({'epoch': 1}, path)

    def dies_halfway(obj, f, *args, **kwargs):
        with open(f, 'wb') as out:
            out.write(b'PK\x03\x04 half a checkpoint')
        raise KeyboardInterrupt  # Ctrl-C mid-write

    monkeypatch.setattr(torch, 'save', dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt_lib.save_atomic({'epoch': 2}, path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.pth']
    assert torch.load(path, weights_only=True) == {'epoch': 1}


@pytest.mark.parametrize('links', [True, False], ids=['hard-link', 'no-links'])
def test_copy_atomic_keeps_its_epoch_when_last_is_saved_again(tmp_path, monkeypatch, links):
    # model_best.pth / checkpoint-EPOCH.pth: one file on disk where links work, a copy where not
    last, best = tmp_path / 'last.pth', tmp_path / 'model_best.pth'
    ckpt_lib.save_atomic({'epoch': 1}, last)
    if not links:
        def refused(src, dst):
            raise PermissionError('no hard links here')
        monkeypatch.setattr(os, 'link', refused)
    ckpt_lib.copy_atomic(last, best)
    assert os.path.samefile(last, best) == links
    ckpt_lib.save_atomic({'epoch': 2}, last)  # the next epoch: best stays at epoch 1
    assert torch.load(best, weights_only=True) == {'epoch': 1}
    assert torch.load(last, weights_only=True) == {'epoch': 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.pth', 'model_best.pth']


KILLED_MID_SAVE = """
import os, signal, sys, torch
from timm_gpd import checkpoint
checkpoint.exit_on_sigterm()
real_save = torch.save
def killed_halfway(obj, f, *args, **kwargs):
    with open(f, 'wb') as out:
        out.write(b'half' * 1000)
    os.kill(os.getpid(), signal.SIGTERM)  # what `kill PID` or a job scheduler sends
torch.save = killed_halfway
checkpoint.save_atomic({'epoch': 2}, sys.argv[1])
"""


def test_sigterm_during_save_leaves_no_tmp(tmp_path, subprocess_env):
    path = tmp_path / 'last.pth'
    ckpt_lib.save_atomic({'epoch': 1}, path)
    proc = subprocess.run([sys.executable, '-c', KILLED_MID_SAVE, str(path)], env=subprocess_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.pth']
    assert torch.load(path, weights_only=True) == {'epoch': 1}


def test_export_refuses_non_finite_weights(tmp_path):
    student = timm.create_model(MODEL, num_classes=10, in_chans=1)
    with torch.no_grad():
        student.fc.weight[0, 0] = float('nan')
        student.bn1.running_var[0] = float('inf')
    with pytest.raises(NonFiniteWeightsError, match='in 2 of') as info:
        ckpt_lib.export_student(student, tmp_path / 'out', {'input_size': (1, 32, 32)})
    assert 'fc.weight' in str(info.value) or 'bn1.running_var' in str(info.value)
    assert not (tmp_path / 'out').exists()


def test_export_writes_timm_hub_layout_atomically(tmp_path, monkeypatch):
    student = timm.create_model(MODEL, num_classes=10, in_chans=1).eval()
    out = ckpt_lib.export_student(student, tmp_path, {'input_size': (1, 32, 32), 'mean': (0.5,), 'std': (0.25,)},
                                  [str(i) for i in range(10)])
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), student(x))
    assert tuple(loaded.pretrained_cfg['mean']) == (0.5,) and loaded.pretrained_cfg['label_names'][3] == '3'
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # a failure while writing config.json leaves the previous files and no temporary one
    monkeypatch.setattr(ckpt_lib, '_write_text', lambda path, text: (path.write_text(text[:10]), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        ckpt_lib.export_student(student, tmp_path, {'input_size': (1, 32, 32)})
    assert {p.name for p in tmp_path.iterdir()} == {'model.safetensors', 'config.json'}
    assert (tmp_path / 'config.json').read_bytes() == before['config.json']


def test_read_summary_numbers_and_empty_cells(tmp_path):
    (tmp_path / 'summary.csv').write_text('epoch,lr,eval_top1,eval_dt_top1\n0,0.05,12.5,\n1,0.01,20,\n')
    rows = ckpt_lib.read_summary(tmp_path / 'summary.csv')
    assert rows == [dict(epoch=0, lr=0.05, eval_top1=12.5, eval_dt_top1=None),
                    dict(epoch=1, lr=0.01, eval_top1=20, eval_dt_top1=None)]
    assert ckpt_lib.read_summary(tmp_path / 'none.csv') == []


# ---------------------------------------------------------------- train.py

@pytest.fixture(scope='module')
def train_module(load_script):
    return load_script('train.py', 'train_for_checkpoint_tests')


def train_argv(data_root, output, *extra):
    return ['--data-dir', str(data_root), '--dataset', 'torch/fashion_mnist', '--model', MODEL, '--in-chans', '1',
            '--img-size', '32', '--train-limit', '64', '--val-limit', '16', '-b', '16', '--epochs', '1',
            '--warmup-epochs', '0', '--lr', '0.05', '--workers', '0', '--seed', '0', '--output', str(output),
            '--experiment', 'x', *extra]


@pytest.mark.parametrize('flag', ['--resume', '--teacher-checkpoint', '--initial-checkpoint'])
def test_train_bad_files_are_one_line_usage_errors(train_module, fashion_mnist_root, tmp_path, flag):
    files = _bad_files(tmp_path)
    names = ['empty.pth', 'random.pth', 'missing.safetensors', 'random.safetensors']
    for name in names:
        path, message = files[name]
        extra = [flag, str(path)] + (['--teacher', MODEL] if flag == '--teacher-checkpoint' else [])
        with pytest.raises(train_module.UsageError) as info:
            train_module.main(train_argv(fashion_mnist_root, tmp_path / 'out', *extra))
        text = str(info.value)
        assert str(path) in text and message in text and '\n' not in text, (flag, name, text)


def test_warmup_that_covers_every_epoch_is_refused(train_module, tmp_path):
    # before anything is opened: the data dir does not even exist
    argv = train_argv(tmp_path / 'no_data', tmp_path / 'out')
    argv[argv.index('--warmup-epochs') + 1] = '5'
    argv[argv.index('--epochs') + 1] = '3'
    with pytest.raises(train_module.UsageError, match='--warmup-epochs 5 >= --epochs 3') as info:
        train_module.main(argv)
    assert 'never reach --lr' in str(info.value)


@pytest.mark.parametrize('extra, message', [
    (['--gpd', '--gpd-ratio', '0.5'], 'gpd_ratio must be a finite number > 1'),
    (['--gpd', '--model', 'coat_tiny'], 'crpe1 (ConvRelPosEnc) splits its channels'),
    (['--gpd', '--gpd-ratio', '0.5', '--num-classes', '10'], 'gpd_ratio must be a finite number > 1'),
])
def test_gpd_errors_come_before_the_dataset(train_module, tmp_path, extra, message):
    argv = train_argv(tmp_path / 'no_data', tmp_path / 'out', *extra)  # a missing dataset would fail later
    with pytest.raises(train_module.UsageError) as info:
        train_module.main(argv)
    assert message in str(info.value) and '\n' not in str(info.value)


def test_divergence_stops_keeps_last_good_checkpoint_exports_nothing(repo_root, subprocess_env, fashion_mnist_root,
                                                                      tmp_path):
    # epoch 0 runs at the warmup lr and is saved; epoch 1 jumps to lr 1e6 without clipping: NaN
    argv = train_argv(fashion_mnist_root, tmp_path, '--gpd', '--epochs', '2', '--warmup-epochs', '1',
                      '--warmup-lr', '0.01', '--lr', '1e6', '--clip-grad', '0', '--log-interval', '1')
    proc = subprocess.run([sys.executable, 'train.py', *argv], cwd=repo_root, env=subprocess_env,
                          capture_output=True, text=True, timeout=600)
    run_dir = tmp_path / 'x'
    assert proc.returncode == 3, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if 'train.py: error:' in line]
    assert len(error) == 1, proc.stderr[-3000:]
    error = error[0]
    assert 'training diverged: loss is not finite at epoch 1, step ' in error
    for part in ('student_ce nan', 'dt_ce nan', 'loss nan'):
        assert part in error
    assert f'last good checkpoint: {run_dir / "last.pth"} (epoch 0)' in error and 'no student exported' in error
    assert 'Traceback' not in proc.stderr and 'Done.' not in proc.stderr
    last = torch.load(run_dir / 'last.pth', weights_only=True)
    assert last['epoch'] == 0 and ckpt_lib.non_finite_tensors(last['state_dict']) == []
    assert ckpt_lib.read_summary(run_dir / 'summary.csv')[-1]['epoch'] == 0
    assert not (run_dir / 'student.safetensors').exists() and not (run_dir / 'config.json').exists()
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith('.tmp')]
    # the run record says what ran it (the model card's Hardware line)
    assert last['env']['hardware'] == ckpt_lib.hardware_description(torch.device('cpu'))
    assert last['data_config']['input_size'] == (1, 32, 32) and len(last['label_names']) == 10


def test_validate_bad_files_are_one_line_errors(tmp_path, caplog):
    import validate
    files = _bad_files(tmp_path)
    for name in ('empty.pth', 'random.pth', 'truncated.pth', 'missing.safetensors', 'random.safetensors'):
        path, message = files[name]
        caplog.clear()
        # the checkpoint is read before any dataset is opened
        model = ['--model', MODEL, '--num-classes', '10'] if name.endswith('.safetensors') else []  # no config.json
        assert validate.main(['--data-dir', str(tmp_path / 'no_data'), '--checkpoint', str(path), *model]) == 2, name
        errors = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR']
        assert len(errors) == 1 and '\n' not in errors[0], (name, errors)
        assert str(path) in errors[0] and (message in errors[0] or 'Checkpoint not found' in errors[0]), errors
