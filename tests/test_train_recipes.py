""" train.py as timm users run it: gpd_* model names, timm's recipe flags, the shipped configs.

Every run is tiny (a few Fashion-MNIST images at 32 px, batch 4, one or two epochs): they check that
the pieces run together and what lands on disk, not accuracy.
"""
import json
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch
import yaml

def tiny_args(data_root, output, experiment, *extra, train_limit=8):
    return ['--data-dir', str(data_root), '--dataset', 'torch/fashion_mnist', '--img-size', '32',
            '--train-limit', str(train_limit), '--val-limit', '4', '-b', '4', '--epochs', '1', '--warmup-epochs', '0',
            '--workers', '0', '--seed', '0', '--log-interval', '1', '--output', str(output),
            '--experiment', experiment, *extra]


def run(repo_root, env, args, launcher=None):
    cmd = [sys.executable, 'train.py', *args] if launcher is None else [*launcher, 'train.py', *args]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f'train.py exited with {proc.returncode}:\n{proc.stderr[-4000:]}')
    return proc


def load_exported_student(run_dir, arch, **kwargs):
    """ student.safetensors into a stock timm model built from config.json, strict. """
    cfg = json.loads((run_dir / 'config.json').read_text())
    assert cfg['architecture'] == arch
    for key, value in kwargs.items():
        assert cfg['model_args'][key] == value, key
    model = timm.create_model(arch, **cfg['model_args'])
    model.load_state_dict(safetensors.torch.load_file(run_dir / 'student.safetensors'), strict=True)
    return model


@pytest.fixture(scope='module')
def output_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('recipes')


@pytest.fixture(autouse=True)
def drop_checkpoints(output_dir):
    """ The training checkpoints of a run once its test has read them: with the DT's optimizer state
    and EMA they weigh up to 1.4 GB each (DeiT-Small), too much for a CI machine's disk in one session. """
    yield
    for path in output_dir.glob('*/*.pth'):
        path.unlink()


@pytest.fixture(scope='module')
def tiny_teacher(tmp_path_factory):
    """ A 10-class grayscale test_resnet checkpoint: the static teacher of the config smoke runs
    (the configs name ImageNet teachers, whose weights an offline test cannot fetch). """
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pth'
    torch.manual_seed(0)
    torch.save(timm.create_model('test_resnet', num_classes=10, in_chans=1).state_dict(), path)
    return path


def config_run(repo_root, env, data_root, output_dir, tiny_teacher, config, *extra, launcher=None):
    """ configs/CONFIG.yaml for one epoch of two batches of 4 at 32 px (its ImageNet teacher, which an
    offline test cannot fetch, replaced by a tiny checkpoint trained on nothing). """
    cfg = yaml.safe_load((repo_root / 'configs' / f'{config}.yaml').read_text())
    args = ['-c', f'configs/{config}.yaml', '--in-chans', '1', '--num-classes', '10', '--model-ema-decay', '0.9']
    if cfg.get('teacher'):
        args += ['--teacher', 'test_resnet', '--teacher-checkpoint', str(tiny_teacher)]
    if cfg.get('precise_bn'):
        args += ['--precise-bn', '1']
    train_limit = 16 if launcher else 8  # two batches per process
    proc = run(repo_root, env, tiny_args(data_root, output_dir, config, *args, *extra, train_limit=train_limit),
               launcher=launcher)
    run_dir = output_dir / config
    assert (run_dir / 'summary.csv').read_text().splitlines()[1].startswith('0,')
    return run_dir, proc


def test_config_fashion_mnist_gpd_model_name(repo_root, subprocess_env, fashion_mnist_root, output_dir, tiny_teacher):
    # `model: gpd_resnet18` and no `gpd: true`: a gpd_* name is GPD training of its student
    run_dir, _ = config_run(repo_root, subprocess_env, fashion_mnist_root, output_dir, tiny_teacher,
                            'gpd_resnet18_fashion_mnist')
    assert yaml.safe_load((run_dir / 'args.yaml').read_text())['gpd'] is True
    load_exported_student(run_dir, 'resnet18', in_chans=1, num_classes=10)
    ckpt = torch.load(run_dir / 'last.pth', map_location='cpu', weights_only=True)
    assert ckpt['arch'] == 'resnet18' and ckpt['gpd']['cbr_init'] == 'scratch'
    assert any(k.startswith('teacher.') for k in ckpt['state_dict'])


def test_config_imagenet_resnet18_accelerate_launch(repo_root, subprocess_env, fashion_mnist_root, output_dir,
                                                    tiny_teacher):
    # the promised usage: `accelerate launch ... train.py --gpd`, two CPU processes (gloo)
    launcher = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
                '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no']
    env = dict(subprocess_env, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1')
    run_dir, proc = config_run(repo_root, env, fashion_mnist_root, output_dir, tiny_teacher, 'gpd_resnet18_imagenet',
                               '--gpd', launcher=launcher)
    assert '2 process(es)' in proc.stderr
    load_exported_student(run_dir, 'resnet18', in_chans=1, num_classes=10)


def test_config_deit_tiny_with_the_deit_recipe_flags(repo_root, subprocess_env, fashion_mnist_root, output_dir,
                                                     tiny_teacher):
    # the config's DeiT recipe, the augmentation flags spelled out as a user would (and a DKD teacher)
    run_dir, _ = config_run(
        repo_root, subprocess_env, fashion_mnist_root, output_dir, tiny_teacher, 'gpd_deit_tiny_imagenet',
        '--mixup', '0.8', '--cutmix', '1.0', '--aa', 'rand-m9-mstd0.5', '--reprob', '0.25', '--drop-path', '0.1')
    student = load_exported_student(run_dir, 'deit_tiny_patch16_224', in_chans=1, num_classes=10)
    assert student.patch_embed.img_size == (32, 32)
    args = yaml.safe_load((run_dir / 'args.yaml').read_text())
    assert (args['mixup'], args['cutmix'], args['aa'], args['reprob'], args['drop_path'], args['opt']) == \
        (0.8, 1.0, 'rand-m9-mstd0.5', 0.25, 0.1, 'adamw')


@pytest.mark.parametrize('config, arch', [('gpd_mobilenetv1_imagenet', 'mobilenetv1_100'),
                                          ('gpd_deit_small_imagenet', 'deit_small_patch16_224')])
def test_config_smoke(repo_root, subprocess_env, fashion_mnist_root, output_dir, tiny_teacher, config, arch):
    run_dir, _ = config_run(repo_root, subprocess_env, fashion_mnist_root, output_dir, tiny_teacher, config)
    load_exported_student(run_dir, arch, in_chans=1, num_classes=10)


def test_every_config_is_smoke_tested(repo_root):
    tested = {'gpd_resnet18_fashion_mnist', 'gpd_resnet18_imagenet', 'gpd_deit_tiny_imagenet',
              'gpd_mobilenetv1_imagenet', 'gpd_deit_small_imagenet'}
    assert {p.stem for p in (repo_root / 'configs').glob('*.yaml')} == tested


def test_recipe_flags_run_together(repo_root, subprocess_env, fashion_mnist_root, output_dir):
    """ --grad-accum-steps (lr from the global batch incl. accumulation), --layer-decay, --channels-last,
    --checkpoint-hist, --model-kwargs, --torchcompile on a GPD test_resnet, two epochs. """
    run(repo_root, subprocess_env, tiny_args(
        fashion_mnist_root, output_dir, 'flags', '--model', 'test_resnet', '--gpd', '--in-chans', '1',
        '--grad-accum-steps', '2', '--lr-base', '0.1', '--lr-base-size', '256', '--layer-decay', '0.8',
        '--channels-last', '--checkpoint-hist', '1', '--epochs', '2', '--model-kwargs', 'zero_init_last=False',
        '--torchcompile', 'eager', train_limit=12))
    run_dir = output_dir / 'flags'
    args = yaml.safe_load((run_dir / 'args.yaml').read_text())
    assert args['lr'] == pytest.approx(0.1 * 4 * 2 / 256)  # batch 4 x 1 process x 2 accumulated
    assert args['model_kwargs'] == {'zero_init_last': False}
    ckpt = torch.load(run_dir / 'last.pth', map_location='cpu', weights_only=True)
    scales = {g['lr_scale'] for g in ckpt['optimizer']['param_groups']}
    assert len(scales) > 2  # layer-wise decay groups of the DT, by the student's group_matcher
    assert len(list(run_dir.glob('checkpoint-*.pth'))) == 1
    assert not any(k.startswith('_orig_mod') for k in ckpt['state_dict'])  # the compiled model's own names
    load_exported_student(run_dir, 'test_resnet', in_chans=1)


# ---------------------------------------------------------------- arguments

@pytest.fixture(scope='module')
def train(load_script):
    return load_script('train.py', 'train_recipes')


def test_gpd_name_resolves_the_student(train):
    args = train.parse_args(['--model', 'gpd_resnet18.fmnist'])
    assert args.gpd and train.student_arch(args) == 'resnet18'
    args = train.parse_args(['--model', 'resnet18'])
    assert not args.gpd and train.student_arch(args) == 'resnet18'


@pytest.mark.parametrize('argv, message', [
    (['--model', 'gpd_resnet18', '--model-kwargs', 'gpd_ratio=3'], 'use --gpd-ratio instead'),
    (['--model', 'gpd_resnet18', '--gpd-cbr-only', '--no-gpd-cbr'], 'cannot go with --no-gpd-cbr'),
    (['--grad-accum-steps', '0'], '--grad-accum-steps takes a number of steps >= 1'),
    (['--mixup', '0.8', '-b', '5'], '--batch-size must be even'),
    (['--checkpoint-hist', '-1'], '--checkpoint-hist takes a number'),
])
def test_conflicting_arguments(train, capsys, argv, message):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err


def test_log_wandb_without_wandb(train, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', None)  # as if not installed
    with pytest.raises(SystemExit):
        train.parse_args(['--log-wandb'])
    assert '--log-wandb needs the wandb package' in capsys.readouterr().err


def test_checkpoint_history_keeps_the_best(train, tmp_path):
    (tmp_path / 'last.pth').write_text('x')
    rows = []
    for epoch, top1 in enumerate([50., 70., 60., 70.]):
        rows.append({'epoch': epoch, 'eval_top1': top1})
        train.keep_checkpoint_history(str(tmp_path), epoch, rows, 'top1', keep=2)
    assert sorted(p.name for p in tmp_path.glob('checkpoint-*.pth')) == ['checkpoint-1.pth', 'checkpoint-3.pth']
    rows = [{'epoch': 0, 'eval_loss': 0.5}, {'epoch': 1, 'eval_loss': 0.7}]
    for p in tmp_path.glob('checkpoint-*.pth'):
        p.unlink()
    for epoch in range(2):
        train.keep_checkpoint_history(str(tmp_path), epoch, rows[:epoch + 1], 'loss', keep=1)
    assert [p.name for p in tmp_path.glob('checkpoint-*.pth')] == ['checkpoint-0.pth']


def test_fsdp_refused_for_gpd(train):
    from types import SimpleNamespace
    from accelerate.utils import DistributedType
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2)
    args = train.parse_args(['--model', 'gpd_resnet18'])
    with pytest.raises(train.UsageError, match='FSDP is not supported for GPD training.*--multi_gpu'):
        train.prepare_model_layout(args, torch.nn.Linear(2, 2), fsdp)


def test_sync_bn_refused_on_cpu_processes(train):
    from types import SimpleNamespace
    from accelerate.utils import DistributedType
    cpu_ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2,
                              device=torch.device('cpu'))
    args = train.parse_args(['--model', 'resnet18', '--sync-bn'])
    with pytest.raises(train.UsageError, match='--sync-bn needs GPU processes'):
        train.prepare_model_layout(args, torch.nn.Linear(2, 2), cpu_ddp)


def test_zero_bit_posterize_policy_refused(train, capsys):
    """ DeiT's rand-m9-mstd0.5-inc1 draws magnitude 10 now and then, where timm's PosterizeIncreasing
    asks for 0 bits; the Pillow installed here refuses that mid-epoch, so it is refused up front. """
    if not train.pillow_refuses_zero_bit_posterize():
        pytest.skip('this Pillow posterizes to 0 bits (black images), as older ones did')
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform
    with pytest.raises(ValueError, match='bits'):  # the failure the check prevents, as timm hits it
        transform = rand_augment_transform('rand-m10-inc1', dict(translate_const=3, img_mean=(128,)))
        for _ in range(200):
            transform(Image.new('L', (8, 8), 100))
    with pytest.raises(SystemExit):
        train.parse_args(['--aa', 'rand-m9-mstd0.5-inc1'])
    assert 'keep the magnitude below 10 with -mmax9' in capsys.readouterr().err
    assert train.parse_args(['--aa', 'rand-m9-mstd0.5-inc1-mmax9']).aa == 'rand-m9-mstd0.5-inc1-mmax9'
