"""Test helpers for validate.py and hfhub: train.py-style run folders made by hand, an offline
Hugging Face cache, and a fake HfApi. (Fashion-MNIST on disk comes from conftest.fashion_mnist_root.)"""
import csv
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import timm
import yaml

from timm_gpd.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, save_atomic
from timm_gpd.checkpoint import read_summary as read_run_summary

def bad_torch_files(good: bytes) -> Dict[str, Tuple[Optional[bytes], str]]:
    """The broken .pth files a user may pass (None: no file), made from a good file's bytes, and what
    the one-line error must say about each."""
    return {
        'missing.pth': (None, 'does not exist'),
        'empty.pth': (b'', 'is empty'),
        # these bytes end torch.load in IndexError('pop from empty list'), not in an UnpicklingError
        'random.pth': (random.Random(2).randbytes(4096), 'is truncated or not a PyTorch file'),
        'truncated.pth': (good[:len(good) // 2], 'is truncated or not a PyTorch file'),
    }


def write_bad_files(directory: Path, contents: Dict[str, Tuple[Optional[bytes], str]]) -> Dict[str, Tuple[Path, str]]:
    """Write each file of ``contents`` (name -> (bytes or None, message)) into ``directory``;
    returns name -> (path, message)."""
    paths = {}
    for name, (content, message) in contents.items():
        path = directory / name
        if content is not None:
            path.write_bytes(content)
        paths[name] = (path, message)
    return paths


def randomize_bn_stats(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-default BN running stats, so a test notices when a loader drops or swaps them."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def train_args(arch: str, **overrides) -> Dict[str, Any]:
    args = dict(model=arch, dataset='torch/fashion_mnist', data_dir='data', val_split='validation',
                num_classes=10, in_chans=1, img_size=32, mean=[0.2860], std=[0.3530], crop_pct=1.0,
                interpolation='bilinear', batch_size=64, epochs=3, lr=0.05, seed=42, teacher=None)
    args.update(overrides)
    return args


def summary_rows(epochs: int, ema: bool = False) -> List[Dict[str, Any]]:
    """A plausible train.py log (its column names); tests read the values back, they are not results."""
    rows = []
    for e in range(epochs):
        row = dict(epoch=e, lr=0.05, epoch_time=round(61.5 + e, 3), train_loss=round(2.0 - 0.3 * e, 4),
                   eval_loss=round(1.5 - 0.2 * e, 4), eval_top1=round(60.0 + 5.5 * e, 3),
                   eval_top5=round(95.0 + 1.25 * e, 3))
        if ema:
            row.update(eval_ema_top1=round(58.0 + 6.5 * e, 3), eval_ema_top5=round(94.0 + 1.5 * e, 3))
        rows.append(row)
    return rows


def write_run(
        run_dir: Path,
        model: torch.nn.Module,
        arch: str,
        gpd: Optional[Dict[str, Any]] = None,
        ema_state: Optional[Dict[str, torch.Tensor]] = None,
        args: Optional[Dict[str, Any]] = None,
        epochs: int = 3,
        env: Optional[Dict[str, Any]] = None,
) -> Path:
    """A train.py output folder by hand (docs/CONTRACTS.md): last.pth, args.yaml, summary.csv.

    Only the keys every checkpoint has (no ``env``, ``data_config``, ``label_names`` unless given):
    what train.py itself records is tested on real runs (``shared_train_run``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    args = args or train_args(arch, epochs=epochs)
    rows = summary_rows(epochs, ema=ema_state is not None)
    checkpoint = dict(
        format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, epoch=epochs - 1, arch=arch, args=args,
        state_dict=model.state_dict(), optimizer={}, scheduler={}, rng={'torch': torch.get_rng_state()},
        metric=rows[-1]['eval_top1'], num_classes=args['num_classes'], in_chans=args['in_chans'],
        img_size=args['img_size'])
    if env is not None:
        checkpoint['env'] = env
    if gpd is not None:
        checkpoint['gpd'] = gpd
    if ema_state is not None:
        checkpoint['state_dict_ema'] = ema_state
    save_atomic(checkpoint, run_dir / 'last.pth')
    (run_dir / 'args.yaml').write_text(yaml.safe_dump(args))
    with (run_dir / 'summary.csv').open('w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return run_dir / 'last.pth'


def make_stock_run(run_dir: Path, arch: str = 'resnet18', seed: int = 0, with_ema: bool = False) -> Path:
    torch.manual_seed(seed)
    model = randomize_bn_stats(timm.create_model(arch, num_classes=10, in_chans=1), seed)
    ema_state = None
    if with_ema:
        ema = randomize_bn_stats(timm.create_model(arch, num_classes=10, in_chans=1), seed + 1)
        ema_state = ema.state_dict()
    return write_run(run_dir, model, arch, ema_state=ema_state)


GPD_KWARGS = dict(ratio=2.0, cbr=True, cbr_only=False, cbr_init='scratch', noise=0.01, seed=0)
GPD_ARCH = 'test_resnet'  # timm's tiny ResNet: the GPD code path of resnet18 at a fraction of the cost
_GPD_RUNS: Dict[str, Path] = {}


def make_gpd_run(run_dir: Path, arch: str = GPD_ARCH, seed: int = 0) -> Path:
    import timm_gpd
    torch.manual_seed(seed)
    student = randomize_bn_stats(timm.create_model(arch, num_classes=10, in_chans=1), seed)
    model = timm_gpd.GPDModel(student, **GPD_KWARGS)
    return write_run(run_dir, model, arch, gpd=dict(GPD_KWARGS), args=train_args(arch, teacher='resnet34', gpd=True))


def shared_gpd_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One hand-made GPD run per session (building a GPDModel is the slow part); treat it as read-only."""
    if 'run' not in _GPD_RUNS:
        _GPD_RUNS['run'] = make_gpd_run(tmp_path_factory.mktemp('gpd_run') / 'exp')
    return _GPD_RUNS['run']


def offline_hub(monkeypatch: pytest.MonkeyPatch, hf_home: Path) -> Path:
    """Point huggingface_hub at an empty HF_HOME, offline; return its hub cache dir.

    huggingface_hub reads HF_HOME/HF_HUB_OFFLINE once, when first imported (timm imports it), so the
    environment alone is too late inside pytest: patch the constants it resolved as well.
    """
    from huggingface_hub import constants
    cache = hf_home / 'hub'
    monkeypatch.setenv('HF_HOME', str(hf_home))
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(constants, 'HF_HOME', str(hf_home))
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    return cache


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records calls and snapshots the uploaded folder."""

    instances: List['FakeHfApi'] = []  # those the code under test built itself

    def __init__(self, owner: Optional[str] = None, **hf_api_kwargs):
        self.owner = owner
        self.hf_api_kwargs = hf_api_kwargs
        FakeHfApi.instances.append(self)
        self.calls: List[tuple] = []
        self.uploaded: Dict[str, bytes] = {}

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        self.calls.append(('create_repo', dict(repo_id=repo_id, private=private, exist_ok=exist_ok, **kwargs)))
        if self.owner and '/' not in repo_id:
            repo_id = f'{self.owner}/{repo_id}'
        return SimpleNamespace(repo_id=repo_id, url=f'https://huggingface.co/{repo_id}')

    def upload_folder(self, repo_id, folder_path, **kwargs):
        self.calls.append(('upload_folder', dict(repo_id=repo_id, folder_path=folder_path, **kwargs)))
        # the publisher may delete its temporary folder afterwards: keep what would have been sent
        folder = Path(folder_path)
        self.uploaded = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob('*') if p.is_file()}
        return SimpleNamespace(commit_url=f'https://huggingface.co/{repo_id}/commit/fake', oid='fake')


TRAIN_VAL_LIMIT = 64
_TRAIN_RUNS: Dict[str, Path] = {}


def shared_train_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path, env: Dict[str, str]) -> Path:
    """last.pth of one real, short train.py GPD run (+EMA) on Fashion-MNIST, once per session."""
    if 'run' not in _TRAIN_RUNS:
        import subprocess
        import sys
        repo_root = Path(__file__).resolve().parents[1]
        output = tmp_path_factory.mktemp('train_output')
        args = ['--data-dir', str(data_root), '--dataset', 'torch/fashion_mnist', '--model', GPD_ARCH,
                '--in-chans', '1', '--img-size', '32', '--train-limit', '64', '--val-limit', str(TRAIN_VAL_LIMIT),
                '-b', '16', '--epochs', '2', '--warmup-epochs', '0', '--lr', '0.05', '--workers', '0', '--seed', '0',
                '--gpd', '--model-ema', '--model-ema-decay', '0.9', '--output', str(output), '--experiment', 'gpd']
        proc = subprocess.run([sys.executable, 'train.py', *args], cwd=repo_root, env=env, capture_output=True,
                              text=True, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f'train.py exited with {proc.returncode}:\n{proc.stderr[-4000:]}')
        _TRAIN_RUNS['run'] = output / 'gpd' / 'last.pth'
    return _TRAIN_RUNS['run']


def read_summary(run_dir: Path) -> List[Dict[str, Any]]:
    return read_run_summary(run_dir / 'summary.csv')


def assert_bad_checkpoint_is_one_line(main, tmp_path: Path, capsys, *extra_args: str):
    """ A script's main() on a file that is not a checkpoint: exit status 2 and one error line naming it. """
    bad = tmp_path / 'not_a_checkpoint.pth'
    bad.write_bytes(b'not a checkpoint')
    assert main([*extra_args, '--checkpoint', str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and 'error:' in err and str(bad) in err
