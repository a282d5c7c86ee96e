"""Publishing students (hfhub.publish), the model card, and loading them back offline."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file as safetensors_load
from torchvision.datasets import FashionMNIST

from hfhub import cache as hub_cache
from hfhub.card import parse_front_matter
from hfhub.checkpoint import CheckpointError, build_model, extract_student, load_checkpoint
from hfhub.publish import main as publish_main, publish
from hub_helpers import (GPD_ARCH, FakeHfApi, make_stock_run, needs_gpd, offline_hub, read_summary, shared_gpd_run,
                         shared_train_run, summary_rows, train_args, write_run)

REPO_ID = 'gpd-test/resnet18.gpd_fmnist'


@pytest.fixture(scope='module')
def stock_run(tmp_path_factory):
    return make_stock_run(tmp_path_factory.mktemp('run') / 'exp')


@pytest.fixture(scope='module')
def published(stock_run, tmp_path_factory):
    out = tmp_path_factory.mktemp('publish') / 'resnet18.gpd_fmnist'
    publish_main(['--checkpoint', str(stock_run), '--repo-id', REPO_ID, '--dry-run', str(out)])
    return out


def _student(checkpoint_path, use_ema=False):
    return extract_student(build_model(load_checkpoint(checkpoint_path), use_ema=use_ema))


def _inputs(in_chans=1, size=32):
    return torch.randn(4, in_chans, size, size, generator=torch.Generator().manual_seed(0))


def test_dry_run_writes_timm_hub_layout(published):
    assert sorted(p.name for p in published.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((published / 'config.json').read_text())
    assert config['architecture'] == 'resnet18'
    assert config['num_classes'] == 10 and config['model_args']['in_chans'] == 1
    assert config['label_names'] == FashionMNIST.classes
    cfg = config['pretrained_cfg']
    assert cfg['input_size'] == [1, 32, 32]
    # the run's preprocessing, not the ImageNet weights' it started from
    assert cfg['mean'] == [0.286] and cfg['std'] == [0.353] and cfg['interpolation'] == 'bilinear'
    assert cfg['tag'] == 'gpd_fmnist' and 'paper_ids' not in cfg


def test_model_card_front_matter_and_metrics(published, stock_run):
    meta, body = parse_front_matter((published / 'README.md').read_text())
    assert meta['library_name'] == 'timm' and meta['license'] == 'apache-2.0'
    assert {'timm', 'image-classification'} <= set(meta['tags'])
    assert meta['datasets'] == ['zalando-datasets/fashion_mnist']
    last = summary_rows(3)[-1]  # the checkpoint is from the last logged epoch
    metrics = {m['name']: m['value'] for m in meta['model-index'][0]['results'][0]['metrics']}
    assert metrics == {'Top-1 accuracy': last['eval_top1'], 'Top-5 accuracy': last['eval_top5']}
    args_block = body.split('```yaml\n', 1)[1].split('```', 1)[0]
    assert yaml.safe_load(args_block) == yaml.safe_load((stock_run.parent / 'args.yaml').read_text())
    assert '**Seed:** 42' in body and '**Hardware:** cpu (2 cores)' in body
    assert f'**Wall time:** 0h 03m 08s ({sum(r["epoch_time"] for r in summary_rows(3)):.1f} s' in body
    assert f"hf-hub:{REPO_ID}" in body


def test_hub_cache_load_is_bit_exact(published, stock_run, tmp_path, monkeypatch):
    cache = offline_hub(monkeypatch, tmp_path / 'hf_home')
    snapshot = hub_cache.place_in_cache(published, REPO_ID)
    assert snapshot.parent.parent == cache / 'models--gpd-test--resnet18.gpd_fmnist'
    assert (snapshot.parent.parent / 'refs' / 'main').read_text() == snapshot.name

    model = timm.create_model(f'hf-hub:{REPO_ID}', pretrained=True).eval()
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x), _student(stock_run)(x))
    assert model.pretrained_cfg['label_names'] == FashionMNIST.classes


def test_local_dir_load_is_bit_exact(published, stock_run):
    model = timm.create_model(f'local-dir:{published}', pretrained=True).eval()
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x), _student(stock_run)(x))


def test_fresh_process_reads_hf_home_offline(published, stock_run, tmp_path):
    """What a user does: HF_HOME + HF_HUB_OFFLINE=1 in the environment, plain timm, no timm_gpd."""
    hf_home = tmp_path / 'hf_home'
    hub_cache.place_in_cache(published, REPO_ID, cache_dir=hf_home / 'hub')
    x_path, out_path = tmp_path / 'x.pt', tmp_path / 'logits.pt'
    torch.save(_inputs(), x_path)
    code = (
        'import sys, timm, torch\n'
        f'm = timm.create_model("hf-hub:{REPO_ID}", pretrained=True).eval()\n'
        'assert "timm_gpd" not in sys.modules and "hfhub" not in sys.modules\n'
        f'torch.save(m(torch.load(r"{x_path}")).detach(), r"{out_path}")\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGINGFACE_'))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE='1')
    subprocess.run([sys.executable, '-c', code], env=env, cwd=tmp_path, check=True, timeout=120)
    with torch.no_grad():
        assert torch.equal(torch.load(out_path), _student(stock_run)(torch.load(x_path)))


def test_missing_repo_offline_names_repo_and_fix(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path / 'hf_home')
    with pytest.raises(hub_cache.HubModelNotFound) as info:
        hub_cache.create_model('hf-hub:gpd-test/not-published', pretrained=True)
    message = str(info.value)
    assert 'gpd-test/not-published' in message and 'HF_HUB_OFFLINE=1' in message
    assert 'python -m hfhub.cache' in message and 'local-dir:' in message


def test_missing_weights_file_offline_names_repo(published, tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path / 'hf_home')
    config_only = tmp_path / 'config_only'
    config_only.mkdir()
    (config_only / 'config.json').write_bytes((published / 'config.json').read_bytes())
    hub_cache.place_in_cache(config_only, 'gpd-test/no-weights')
    with pytest.raises(hub_cache.HubModelNotFound, match='gpd-test/no-weights'):
        hub_cache.create_model('hf-hub:gpd-test/no-weights', pretrained=True)


def test_place_in_cache_is_idempotent(published, tmp_path):
    first = hub_cache.place_in_cache(published, REPO_ID, cache_dir=tmp_path)
    second = hub_cache.place_in_cache(published, REPO_ID, cache_dir=tmp_path)
    assert first == second
    blob_names = {p.name for p in (tmp_path / 'models--gpd-test--resnet18.gpd_fmnist' / 'blobs').iterdir()}
    assert len(blob_names) == 3
    assert all((first / n).resolve().parent.name == 'blobs' for n in ('config.json', 'model.safetensors'))


def test_upload_sends_the_dry_run_folder(published, stock_run):
    api = FakeHfApi()
    publish(stock_run, REPO_ID, private=True, api=api)
    assert [name for name, _ in api.calls] == ['create_repo', 'upload_folder']
    assert api.calls[0][1] == dict(repo_id=REPO_ID, private=True, exist_ok=True)
    assert api.calls[1][1]['repo_id'] == REPO_ID
    assert api.uploaded == {p.name: p.read_bytes() for p in published.iterdir()}


def test_cli_upload_builds_a_timm_hf_api(stock_run, monkeypatch, capsys):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeHfApi)
    monkeypatch.setattr(FakeHfApi, 'instances', [])
    publish_main(['--checkpoint', str(stock_run), '--repo-id', REPO_ID, '--private'])
    api, = FakeHfApi.instances
    assert api.hf_api_kwargs == dict(library_name='timm', library_version=timm.__version__)
    assert api.calls[0][1]['private'] is True and set(api.uploaded) == {'README.md', 'config.json', 'model.safetensors'}
    assert f'Uploaded to https://huggingface.co/{REPO_ID}' in capsys.readouterr().out


def test_upload_goes_where_the_hub_put_the_repo(stock_run):
    api = FakeHfApi(owner='me')
    publish(stock_run, 'resnet18.gpd_fmnist', api=api)
    assert api.calls[1][1]['repo_id'] == 'me/resnet18.gpd_fmnist'


def test_ema_weights_are_published_by_default(tmp_path):
    ckpt = make_stock_run(tmp_path / 'exp', with_ema=True)
    ema_dir, live_dir = tmp_path / 'ema', tmp_path / 'live'
    publish(ckpt, REPO_ID, dry_run=ema_dir)
    publish(ckpt, REPO_ID, dry_run=live_dir, use_ema=False)
    checkpoint = torch.load(ckpt, weights_only=True)
    ema_model = timm.create_model(f'local-dir:{ema_dir}', pretrained=True)
    live_model = timm.create_model(f'local-dir:{live_dir}', pretrained=True)
    key = 'bn1.running_mean'
    assert torch.equal(ema_model.state_dict()[key], checkpoint['state_dict_ema'][key])
    assert torch.equal(live_model.state_dict()[key], checkpoint['state_dict'][key])
    # the card reports what train.py logged for the EMA student, not for the live one
    ema_row = summary_rows(3, ema=True)[-1]
    meta, _ = parse_front_matter((ema_dir / 'README.md').read_text())
    values = [m['value'] for m in meta['model-index'][0]['results'][0]['metrics']]
    assert values == [ema_row['eval_ema_top1'], ema_row['eval_ema_top5']]
    meta, _ = parse_front_matter((live_dir / 'README.md').read_text())
    values = [m['value'] for m in meta['model-index'][0]['results'][0]['metrics']]
    assert values == [ema_row['eval_top1'], ema_row['eval_top5']]


def test_bad_checkpoints_give_clear_errors(tmp_path, stock_run):
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        publish(tmp_path / 'missing.pth', REPO_ID, dry_run=tmp_path / 'out')
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='Cannot read checkpoint'):
        publish(corrupt, REPO_ID, dry_run=tmp_path / 'out')
    plain = tmp_path / 'plain.pth'
    torch.save(timm.create_model('resnet18', num_classes=10).state_dict(), plain)
    with pytest.raises(CheckpointError, match='not a timm-gpd checkpoint'):
        publish(plain, REPO_ID, dry_run=tmp_path / 'out')
    checkpoint = torch.load(stock_run, weights_only=True)
    checkpoint['num_classes'] = 5
    torch.save(checkpoint, tmp_path / 'five.pth')
    with pytest.raises(CheckpointError, match='num_classes=5'):
        publish(tmp_path / 'five.pth', REPO_ID, dry_run=tmp_path / 'out')


def test_label_names_come_from_the_run_folder(tmp_path):
    """A folder dataset's classes are known only to train.py, which writes them to config.json."""
    model = timm.create_model('resnet18', num_classes=10, in_chans=1)
    ckpt = write_run(tmp_path / 'exp', model, 'resnet18', args=train_args('resnet18', dataset=''))
    names = [f'class_{i}' for i in range(10)]
    (ckpt.parent / 'config.json').write_text(json.dumps({'architecture': 'resnet18', 'label_names': names}))
    out = publish(ckpt, REPO_ID, dry_run=tmp_path / 'out')
    assert json.loads((out / 'config.json').read_text())['label_names'] == names
    (ckpt.parent / 'config.json').unlink()
    out = publish(ckpt, REPO_ID, dry_run=tmp_path / 'out2')
    assert 'label_names' not in json.loads((out / 'config.json').read_text())


def test_card_without_summary_still_publishes(tmp_path):
    model = timm.create_model('resnet18', num_classes=10, in_chans=1)
    ckpt = write_run(tmp_path / 'exp', model, 'resnet18')
    (ckpt.parent / 'summary.csv').unlink()
    out = publish(ckpt, REPO_ID, dry_run=tmp_path / 'out')
    meta, body = parse_front_matter((out / 'README.md').read_text())
    assert 'model-index' not in meta and 'No summary.csv' in body


@needs_gpd
def test_gpd_checkpoint_publishes_stock_student(tmp_path, tmp_path_factory, monkeypatch):
    ckpt = shared_gpd_run(tmp_path_factory)
    repo_id = f'gpd-test/{GPD_ARCH}.gpd_fmnist'
    out = publish(ckpt, repo_id, dry_run=tmp_path / 'out')
    assert json.loads((out / 'config.json').read_text())['architecture'] == GPD_ARCH
    meta, body = parse_front_matter((out / 'README.md').read_text())
    assert 'gap-preserving-distillation' in meta['tags']
    assert 'ratio 2.0' in body and '`resnet34`' in body

    offline_hub(monkeypatch, tmp_path / 'hf_home')
    hub_cache.place_in_cache(out, repo_id)
    model = timm.create_model(f'hf-hub:{repo_id}', pretrained=True).eval()
    gpd_model = build_model(load_checkpoint(ckpt))
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x), gpd_model.extract_student()(x))
        reference = gpd_model(x)
        assert torch.allclose(model(x), reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


@needs_gpd
def test_publish_real_train_run_and_pull_from_cache(fashion_mnist_root, subprocess_env, tmp_path_factory, tmp_path,
                                                    monkeypatch):
    ckpt = shared_train_run(tmp_path_factory, fashion_mnist_root, subprocess_env)
    repo_id = f'gpd-test/{GPD_ARCH}.gpd_fmnist'
    out = tmp_path / 'out'
    publish_main(['--checkpoint', str(ckpt), '--repo-id', repo_id, '--dry-run', str(out)])

    meta, body = parse_front_matter((out / 'README.md').read_text())
    logged = read_summary(ckpt.parent)[-1]
    metrics = {m['name']: m['value'] for m in meta['model-index'][0]['results'][0]['metrics']}
    # train.py ran with --model-ema, so the published weights and the headline numbers are the EMA student's
    assert metrics == {'Top-1 accuracy': logged['eval_ema_top1'], 'Top-5 accuracy': logged['eval_ema_top5']}
    args_block = body.split('```yaml\n', 1)[1].split('```', 1)[0]
    assert yaml.safe_load(args_block) == yaml.safe_load((ckpt.parent / 'args.yaml').read_text())
    assert 'ratio 2.0' in body and f'({sum(r["epoch_time"] for r in read_summary(ckpt.parent)):.1f} s' in body

    offline_hub(monkeypatch, tmp_path / 'hf_home')
    hub_cache.place_in_cache(out, repo_id)
    pulled = timm.create_model(f'hf-hub:{repo_id}', pretrained=True).eval()
    exported = timm.create_model(GPD_ARCH, num_classes=10, in_chans=1).eval()
    exported.load_state_dict(safetensors_load(ckpt.parent / 'student.safetensors'))
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(pulled(x), _student(ckpt, use_ema=True)(x))
        assert torch.equal(pulled(x), exported(x))
