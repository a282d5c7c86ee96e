"""Publishing students (hfhub.publish), the model card, and loading them back offline."""
import csv
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file as safetensors_load
from torchvision.datasets import FashionMNIST

from hfhub import cache as hub_cache
from hfhub.publish import PublishError, main as publish_main, publish
from hub_helpers import (GPD_ARCH, FakeHfApi, bad_torch_files, make_stock_run, offline_hub, read_summary,
                         shared_gpd_run, shared_train_run, summary_rows, train_args, write_bad_files, write_run)
from timm_gpd.checkpoint import CheckpointError, build_model, extract_student, hardware_description, load_checkpoint

REPO_ID = 'gpd-test/resnet18.gpd_fmnist'


def parse_card(path):
    """(metadata, body) of a model card, read back by huggingface_hub as the Hub does."""
    card = ModelCard.load(path)
    return card.data.to_dict(), card.text


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
    # it describes the trained student, not the stock weights its architecture has in timm
    assert not {'tag', 'license', 'paper_ids', 'paper_name', 'origin_url'} & set(cfg)


def test_model_card_front_matter_and_metrics(published, stock_run):
    meta, body = parse_card(published / 'README.md')
    assert meta['library_name'] == 'timm' and meta['license'] == 'apache-2.0'
    assert {'timm', 'image-classification'} <= set(meta['tags'])
    assert meta['datasets'] == ['zalando-datasets/fashion_mnist']
    last = summary_rows(3)[-1]  # the checkpoint is from the last logged epoch
    metrics = {m['name']: m['value'] for m in meta['model-index'][0]['results'][0]['metrics']}
    assert metrics == {'Top-1 accuracy': last['eval_top1'], 'Top-5 accuracy': last['eval_top5']}
    args_block = body.split('```yaml\n', 1)[1].split('```', 1)[0]
    assert yaml.safe_load(args_block) == yaml.safe_load((stock_run.parent / 'args.yaml').read_text())
    # a hand-made checkpoint has no env record (train.py's runs do: see the real-run test)
    assert '**Seed:** 42' in body and '**Hardware:** not recorded' in body
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
    meta, _ = parse_card(ema_dir / 'README.md')
    values = [m['value'] for m in meta['model-index'][0]['results'][0]['metrics']]
    assert values == [ema_row['eval_ema_top1'], ema_row['eval_ema_top5']]
    meta, _ = parse_card(live_dir / 'README.md')
    values = [m['value'] for m in meta['model-index'][0]['results'][0]['metrics']]
    assert values == [ema_row['eval_top1'], ema_row['eval_top5']]


def _bad_files(tmp_path, stock_run):
    """Files a user may pass by mistake, and what the one-line error must say about each."""
    data = stock_run.read_bytes()
    files = {
        **bad_torch_files(data),
        'empty.safetensors': (b'', 'is empty'),
        'random.safetensors': (bytes(range(256)) * 64, 'not a timm-gpd checkpoint'),
    }
    return write_bad_files(tmp_path, files)


def test_bad_checkpoints_give_clear_errors(tmp_path, stock_run):
    for name, (path, message) in _bad_files(tmp_path, stock_run).items():
        with pytest.raises(CheckpointError) as info:
            publish(path, REPO_ID, dry_run=tmp_path / 'out')
        text = str(info.value)
        assert str(path) in text and '\n' not in text, name
        if name != 'random.safetensors':
            assert message in text, (name, text)
    plain = tmp_path / 'plain.pth'
    torch.save(timm.create_model('resnet18', num_classes=10).state_dict(), plain)
    with pytest.raises(CheckpointError, match='not a timm-gpd checkpoint') as info:
        publish(plain, REPO_ID, dry_run=tmp_path / 'out')
    assert '--model' not in str(info.value)  # publish has no --model option to point to
    checkpoint = torch.load(stock_run, weights_only=True)
    checkpoint['num_classes'] = 5
    torch.save(checkpoint, tmp_path / 'five.pth')
    with pytest.raises(CheckpointError, match='num_classes=5'):
        publish(tmp_path / 'five.pth', REPO_ID, dry_run=tmp_path / 'out')
    assert not (tmp_path / 'out').exists()  # nothing half-written


def test_cli_reports_bad_checkpoints_in_one_line(tmp_path, stock_run, subprocess_env, repo_root):
    for name, (path, message) in _bad_files(tmp_path, stock_run).items():
        if name not in ('empty.pth', 'random.pth', 'random.safetensors'):
            continue  # one process each: the three that escaped as tracebacks
        proc = subprocess.run([sys.executable, '-m', 'hfhub.publish', '--checkpoint', str(path), '--repo-id', REPO_ID,
                               '--dry-run', str(tmp_path / 'out')], cwd=repo_root, env=subprocess_env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('python -m hfhub.publish: error: '), (name, proc.stderr)
        assert str(path) in lines[0] and 'Traceback' not in proc.stderr


@pytest.mark.parametrize('repo_id', ['bad repo/na me!!', 'a/b/c', '../../etc', 'org/name.git', 'org/a--b', ''])
def test_invalid_repo_id_is_refused(tmp_path, stock_run, repo_id):
    with pytest.raises(PublishError, match='invalid --repo-id'):
        publish(stock_run, repo_id, dry_run=tmp_path / 'out')
    with pytest.raises(PublishError, match='invalid --repo-id'):
        publish(stock_run, repo_id, api=FakeHfApi())
    assert not (tmp_path / 'out').exists()


def test_dry_run_never_replaces_files_it_did_not_write(tmp_path, stock_run, capsys):
    out = tmp_path / 'mine'
    out.mkdir()
    (out / 'README.md').write_text('my notes')
    (out / 'notes.txt').write_text('keep me')
    argv = ['--checkpoint', str(stock_run), '--repo-id', REPO_ID, '--dry-run', str(out)]
    assert publish_main(argv) == 2
    err = capsys.readouterr().err
    assert 'already has README.md' in err and '--overwrite' in err
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'notes.txt']
    assert (out / 'README.md').read_text() == 'my notes'

    (out / 'README.md').unlink()
    assert publish_main(argv) == 0  # other files in the folder do not stop it, and are not listed as written
    printed = capsys.readouterr().out
    assert 'README.md, config.json, model.safetensors' in printed and 'notes.txt' not in printed
    assert (out / 'notes.txt').read_text() == 'keep me'
    assert publish_main(argv) == 2  # a second run would replace the first one's files
    capsys.readouterr()
    before = (out / 'model.safetensors').stat().st_mtime_ns
    assert publish_main(argv + ['--overwrite']) == 0
    assert (out / 'model.safetensors').stat().st_mtime_ns >= before
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors', 'notes.txt']


def test_card_is_a_huggingface_hub_model_card(published):
    card = ModelCard.load(published / 'README.md')
    last = summary_rows(3)[-1]
    results = {r.metric_name: r for r in card.data.eval_results}
    assert results['Top-1 accuracy'].metric_value == last['eval_top1']
    assert results['Top-5 accuracy'].metric_value == last['eval_top5']
    assert {r.task_type for r in results.values()} == {'image-classification'}
    assert {r.dataset_type for r in results.values()} == {'zalando-datasets/fashion_mnist'}
    assert card.data.model_name == REPO_ID.split('/')[-1]


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
    meta, body = parse_card(out / 'README.md')
    assert 'model-index' not in meta and 'No summary.csv' in body


def test_gpd_checkpoint_publishes_stock_student(tmp_path, tmp_path_factory, monkeypatch):
    ckpt = shared_gpd_run(tmp_path_factory)
    repo_id = f'gpd-test/{GPD_ARCH}.gpd_fmnist'
    out = publish(ckpt, repo_id, dry_run=tmp_path / 'out')
    assert json.loads((out / 'config.json').read_text())['architecture'] == GPD_ARCH
    meta, body = parse_card(out / 'README.md')
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


def test_publish_real_train_run_and_pull_from_cache(fashion_mnist_root, subprocess_env, tmp_path_factory, tmp_path,
                                                    monkeypatch):
    ckpt = shared_train_run(tmp_path_factory, fashion_mnist_root, subprocess_env)
    repo_id = f'gpd-test/{GPD_ARCH}.gpd_fmnist'
    out = tmp_path / 'out'
    publish_main(['--checkpoint', str(ckpt), '--repo-id', repo_id, '--dry-run', str(out)])

    meta, body = parse_card(out / 'README.md')
    logged = read_summary(ckpt.parent)[-1]
    metrics = {m['name']: m['value'] for m in meta['model-index'][0]['results'][0]['metrics']}
    # train.py ran with --model-ema, so the published weights and the headline numbers are the EMA student's
    assert metrics == {'Top-1 accuracy': logged['eval_ema_top1'], 'Top-5 accuracy': logged['eval_ema_top5']}
    args_block = body.split('```yaml\n', 1)[1].split('```', 1)[0]
    assert yaml.safe_load(args_block) == yaml.safe_load((ckpt.parent / 'args.yaml').read_text())
    assert 'ratio 2.0' in body and f'({sum(r["epoch_time"] for r in read_summary(ckpt.parent)):.1f} s' in body
    assert f'**Hardware:** {hardware_description()}' in body  # train.py records the run's hardware

    offline_hub(monkeypatch, tmp_path / 'hf_home')
    hub_cache.place_in_cache(out, repo_id)
    pulled = timm.create_model(f'hf-hub:{repo_id}', pretrained=True).eval()
    exported = timm.create_model(GPD_ARCH, num_classes=10, in_chans=1).eval()
    exported.load_state_dict(safetensors_load(ckpt.parent / 'student.safetensors'))
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(pulled(x), _student(ckpt, use_ema=True)(x))
        assert torch.equal(pulled(x), exported(x))


def test_train_export_and_publish_write_the_same_config(fashion_mnist_root, subprocess_env, tmp_path_factory,
                                                       tmp_path):
    """train.py's student folder and hfhub.publish's folder come from one writer: same config.json."""
    ckpt = shared_train_run(tmp_path_factory, fashion_mnist_root, subprocess_env)
    out = publish(ckpt, f'gpd-test/{GPD_ARCH}.gpd_fmnist', dry_run=tmp_path / 'out')
    trained = json.loads((ckpt.parent / 'config.json').read_text())
    published = json.loads((out / 'config.json').read_text())
    assert published == trained
    assert trained['architecture'] == GPD_ARCH and trained['num_classes'] == 10
    assert trained['model_args']['in_chans'] == 1 and trained['label_names'] == FashionMNIST.classes
    assert not {'tag', 'license', 'paper_ids'} & set(trained['pretrained_cfg'])
    # and the weights are the same student (EMA: train.py ran with --model-ema)
    exported = safetensors_load(ckpt.parent / 'student.safetensors')
    pub = safetensors_load(out / 'model.safetensors')
    assert exported.keys() == pub.keys() and all(torch.equal(exported[k], pub[k]) for k in exported)


def test_non_finite_weights_are_never_published(tmp_path, stock_run):
    checkpoint = torch.load(stock_run, weights_only=True)
    checkpoint['state_dict']['fc.weight'][0, 0] = float('nan')
    torch.save(checkpoint, tmp_path / 'nan.pth')
    with pytest.raises(CheckpointError, match='non-finite'):
        publish(tmp_path / 'nan.pth', REPO_ID, dry_run=tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_card_notes_become_a_section_after_the_results(stock_run, tmp_path, capsys):
    notes = tmp_path / 'notes.md'
    notes.write_text('## How it compares\n\n| method | test top-1 |\n|---|---|\n| GPD | 91.0 |\n')
    out = tmp_path / 'out'
    assert publish_main(['--checkpoint', str(stock_run), '--repo-id', REPO_ID, '--dry-run', str(out),
                         '--card-notes', str(notes)]) == 0
    _, body = parse_card(out / 'README.md')
    assert body.index('## Results') < body.index('## How it compares') < body.index('## Model Usage')
    assert '| GPD | 91.0 |' in body
    capsys.readouterr()
    assert publish_main(['--checkpoint', str(stock_run), '--repo-id', REPO_ID, '--dry-run', str(tmp_path / 'o2'),
                         '--card-notes', str(tmp_path / 'missing.md')]) == 2
    assert '--card-notes' in capsys.readouterr().err and not (tmp_path / 'o2' / 'README.md').exists()


def test_a_held_out_validation_run_is_carded_by_its_test_split(tmp_path):
    """train.py --val-holdout validates on the tail of the training split (eval_*) and scores the
    evaluation split as test_*: the card's metrics (split 'test') are the test_* ones, and its
    results say which is which."""
    model = timm.create_model('resnet18', num_classes=10, in_chans=1)
    ckpt = write_run(tmp_path / 'exp', model, 'resnet18', args=train_args('resnet18', val_holdout=5000))
    rows = read_summary(ckpt.parent)
    for i, row in enumerate(rows):
        row.update(test_top1=50.0 + i, test_top5=90.00000000000001 + i, test_gap_top1=0.29999999999999716)
    with (ckpt.parent / 'summary.csv').open('w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = publish(ckpt, REPO_ID, dry_run=tmp_path / 'out')
    meta, body = parse_card(out / 'README.md')
    result = meta['model-index'][0]['results'][0]
    assert result['dataset']['split'] == 'test'
    assert {m['name']: m['value'] for m in result['metrics']} == {'Top-1 accuracy': 52.0, 'Top-5 accuracy': 92.0}
    assert 'eval_*: the last 5,000 training images, held out' in body and '- test_top1: 52.0' in body
    assert '- test_gap_top1: 0.3\n' in body  # the CSV's float noise is carded nowhere, metadata included
    # without the holdout, eval_* is the evaluation split, as before
    plain = write_run(tmp_path / 'plain', model, 'resnet18')
    meta, _ = parse_card(publish(plain, REPO_ID, dry_run=tmp_path / 'out2') / 'README.md')
    assert meta['model-index'][0]['results'][0]['metrics'][0]['value'] == summary_rows(3)[-1]['eval_top1']
