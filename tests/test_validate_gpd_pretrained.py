"""validate.py --model gpd_resnet18 --pretrained from an offline Hugging Face cache: the student (and the
DT) of the fine-tune start evaluate as the stock model with the same weights."""
import json

import pytest
import timm
import torch

import validate
from hfhub.cache import place_in_cache
from hub_helpers import offline_hub, randomize_bn_stats


@pytest.fixture
def cached_resnet18_a1(tmp_path, monkeypatch):
    """ 'timm/resnet18.a1_in1k' (gpd_resnet18's default tag) in an offline cache: a stock resnet18 with
    random weights, as no download is possible. """
    cache = offline_hub(monkeypatch, tmp_path / 'hf_home')
    torch.manual_seed(0)
    stock = randomize_bn_stats(timm.create_model('resnet18'), seed=1).eval()
    folder = tmp_path / 'published'
    timm.models.save_for_hf(stock, folder)
    assert timm.models.get_pretrained_cfg('resnet18.a1_in1k').hf_hub_id == 'timm/resnet18.a1_in1k'
    place_in_cache(folder, 'timm/resnet18.a1_in1k', cache)
    return stock


def _validate(data_root, results, *args):
    rc = validate.main(['--data-dir', str(data_root), '--dataset', 'torch/fashion_mnist', '--limit', '16',
                        '-b', '16', '-j', '0', '--img-size', '32', '--results-file', str(results), *args])
    assert rc == 0
    return json.loads(results.read_text())


def test_validate_gpd_pretrained_offline(cached_resnet18_a1, fashion_mnist_root, tmp_path):
    stock = _validate(fashion_mnist_root, tmp_path / 'stock.json', '--model', 'resnet18', '--pretrained')
    gpd = _validate(fashion_mnist_root, tmp_path / 'gpd.json', '--model', 'gpd_resnet18', '--pretrained')
    dt = _validate(fashion_mnist_root, tmp_path / 'dt.json', '--model', 'gpd_resnet18', '--pretrained',
                   '--gpd-teacher')
    assert (gpd['evaluated'], dt['evaluated']) == ('gpd_student', 'dynamic_teacher')
    for other in (gpd, dt):
        # fine-tune init: CBR origin branch only, DT widened exactly: the cached weights' function
        assert (other['top1'], other['top5'], other['num_images']) == (stock['top1'], stock['top5'], 16)
        assert other['loss'] == pytest.approx(stock['loss'], abs=1e-4)
    # the weights matter: a random gpd_resnet18 evaluates differently
    fresh = _validate(fashion_mnist_root, tmp_path / 'fresh.json', '--model', 'gpd_resnet18')
    assert fresh['loss'] != pytest.approx(stock['loss'], abs=1e-3)
