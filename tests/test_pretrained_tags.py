"""gpd_* pretrained tags: the wrapper's student starts from published student weights, offline."""
import pytest
import timm
import torch

import timm_gpd  # noqa: F401  (registers the gpd_* entrypoints)
from hfhub.cache import place_in_cache
from hub_helpers import offline_hub, randomize_bn_stats


@pytest.fixture
def cached_fmnist_student(tmp_path, monkeypatch):
    """A stock resnet18 (1 channel, 10 classes) published as timm-gpd/resnet18.gpd_fmnist in an offline cache."""
    cache = offline_hub(monkeypatch, tmp_path / 'hf_home')
    torch.manual_seed(0)
    stock = randomize_bn_stats(timm.create_model('resnet18', num_classes=10, in_chans=1), seed=1).eval()
    folder = tmp_path / 'published'
    timm.models.save_for_hf(stock, folder)
    place_in_cache(folder, 'timm-gpd/resnet18.gpd_fmnist', cache)
    return stock


def test_gpd_pretrained_student_equals_published_model(cached_fmnist_student):
    model = timm.create_model('gpd_resnet18.fmnist', pretrained=True, in_chans=1).eval()
    assert model.cbr_init == 'finetune'
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        reference = cached_fmnist_student(x)
        torch.testing.assert_close(model(x), reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x, mode='teacher'), reference, rtol=0, atol=1e-4)
    assert model.pretrained_cfg['hf_hub_id'] == 'timm-gpd/resnet18.gpd_fmnist'


def test_gpd_pretrained_with_other_class_count_resets_the_head(cached_fmnist_student):
    model = timm.create_model('gpd_resnet18.fmnist', pretrained=True, in_chans=1, num_classes=5).eval()
    assert model.student.get_classifier().out_features == 5
    plain = model.extract_student()
    # the body is the published one, only the classifier was re-initialized
    torch.testing.assert_close(plain.layer1[0].conv1.weight, cached_fmnist_student.layer1[0].conv1.weight)


def test_missing_weights_offline_is_a_clear_error(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path / 'empty_home')
    with pytest.raises(FileNotFoundError, match=r'timm-gpd/resnet18\.gpd_fmnist.*hfhub\.cache'):
        timm.create_model('gpd_resnet18.fmnist', pretrained=True, in_chans=1)
