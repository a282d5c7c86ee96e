""" train.py --device-augment (timm_gpd/device_augment.py): timm's training transform drawn on the
device, checked against torchvision's PIL transforms for the same parameters; the loader's order,
sharding and exact resume. """
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import resolve_data_config
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.datasets import FashionMNIST
from torchvision.transforms import InterpolationMode

from timm_gpd.device_augment import DeviceAugment, DeviceTrainLoader, crop_params, images_of

from test_train_cli import assert_same_training, run_train, train_args


@pytest.fixture(scope='module')
def fmnist_images(fashion_mnist_root):
    images, targets = images_of(FashionMNIST(str(fashion_mnist_root), train=True), 1)
    return images[:300], targets[:300]


def test_crop_params_draw_like_timm():
    """ Same distribution as timm's RandomResizedCropAndInterpolation.get_params (10 tries, then a
    central crop), every crop inside the image; the fallback is timm's exactly. """
    n, size, scale, ratio = 20000, 28, (0.08, 1.0), (3. / 4., 4. / 3.)
    ours = crop_params(n, size, size, scale, ratio, torch.Generator().manual_seed(0)).double()
    random.seed(0)
    img = Image.new('L', (size, size))
    timms = torch.tensor([RandomResizedCropAndInterpolation.get_params(img, scale, ratio) for _ in range(n)]).double()
    top, left, h, w = ours.unbind(1)
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= size).all() and (left + w <= size).all()
    for column in range(4):  # (top, left, h, w): means within 0.15 px, spreads within 3 %
        assert ours[:, column].mean() == pytest.approx(timms[:, column].mean().item(), abs=0.15)
        assert ours[:, column].std() == pytest.approx(timms[:, column].std().item(), rel=0.03)
    for never_fits in ((3.0, 4.0), (1.5, 2.0)):  # every try too large: the central crop
        for fallback_ratio in ((3. / 4., 4. / 3.), (2.0, 3.0), (0.25, 0.5)):
            expected = RandomResizedCropAndInterpolation.get_params(Image.new('L', (28, 20)), never_fits,
                                                                    fallback_ratio)
            got = crop_params(3, 20, 28, never_fits, fallback_ratio, torch.Generator().manual_seed(1))
            assert got.tolist() == [list(expected)] * 3


def _pil_crops(images, params, flips, size, interpolation):
    out = []
    for image, (i, j, h, w), flip in zip(images, params.tolist(), flips.tolist()):
        im = TF.resized_crop(Image.fromarray(image[0].numpy(), mode='L'), i, j, h, w, list(size),
                             InterpolationMode(interpolation))
        out.append(torch.from_numpy(np.array(TF.hflip(im) if flip else im)).float())
    return torch.stack(out)[:, None]


@pytest.mark.parametrize('interpolation,tolerance', [('bilinear', 1.0), ('nearest', 0.0)])
def test_crops_and_flips_match_torchvision(fmnist_images, interpolation, tolerance):
    """ For the crops and flips it draws, the device's output is torchvision's PIL crop-then-resize
    and flip of the same image: exact for nearest, within one gray level for bilinear. """
    images, _ = fmnist_images
    augment = DeviceAugment((32, 32), (0.,), (1. / 255,), scale=(0.08, 1.0), hflip=0.5, color_jitter=0,
                            interpolation=interpolation)
    out = augment(images, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)  # the same draws, in the same order
    params = crop_params(len(images), 28, 28, (0.08, 1.0), (3. / 4., 4. / 3.), generator)
    flips = torch.rand(len(images), generator=generator, dtype=torch.float64) < 0.5
    assert 0 < flips.sum() < len(images)
    reference = _pil_crops(images, params, flips, (32, 32), interpolation)
    assert (out - reference).abs().max() <= tolerance
    assert (out - reference).abs().mean() < 0.2


def _pil_jitter(images, factors, order, mode):
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    out = []
    for image, f, o in zip(images, factors.tolist(), order.tolist()):
        im = Image.fromarray(image.permute(1, 2, 0).numpy().squeeze(-1) if mode == 'L' else
                             image.permute(1, 2, 0).numpy(), mode=mode)
        for k in o:
            im = ops[k](im, f[k])
        arr = torch.from_numpy(np.array(im)).float()
        out.append(arr[None] if mode == 'L' else arr.permute(2, 0, 1))
    return torch.stack(out)


def test_color_jitter_is_torchvisions_on_pil_images(fmnist_images):
    """ Brightness, contrast and saturation in each image's own random order: pixel for pixel what
    torchvision's ColorJitter computes on PIL images with the same factors and order, for
    grayscale and RGB images. """
    rgb = torch.randint(0, 256, (100, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for images, mode in ((fmnist_images[0], 'L'), (rgb, 'RGB')):
        channels = images.shape[1]
        augment = DeviceAugment(tuple(images.shape[-2:]), (0.,) * channels, (1.,) * channels, color_jitter=0.4)
        out = augment._color_jitter(images.float(), torch.Generator().manual_seed(3))
        generator = torch.Generator().manual_seed(3)
        factors = 0.6 + 0.8 * torch.rand(len(images), 3, generator=generator)
        order = torch.rand(len(images), 3, generator=generator).argsort(dim=1)
        assert torch.equal(out, _pil_jitter(images, factors, order, mode))
        assert not torch.equal(out, images.float())


def test_images_of(fashion_mnist_root):
    """ The in-memory images as [N, C, H, W] uint8 in the channels the model takes (PIL's
    conversions), and a clear error for a dataset that does not hold them. """
    dataset = FashionMNIST(str(fashion_mnist_root), train=False)
    gray, targets = images_of(dataset, 1)
    assert gray.shape == (10000, 1, 28, 28) and gray.dtype == torch.uint8 and torch.equal(targets, dataset.targets)
    rgb, _ = images_of(dataset, 3)
    assert rgb.shape == (10000, 3, 28, 28) and torch.equal(rgb[:, 1], gray[:, 0])

    class Colored:
        data = np.random.default_rng(0).integers(0, 256, (20, 5, 6, 3), dtype=np.uint8)
        targets = list(range(20))
    luma, _ = images_of(Colored(), 1)
    pil = np.stack([np.array(Image.fromarray(im, mode='RGB').convert('L')) for im in Colored.data])
    assert torch.equal(luma[:, 0], torch.from_numpy(pil))
    with pytest.raises(ValueError, match='object does not hold its images in memory'):
        images_of(object(), 1)


def test_loader_order_sharding_and_epochs(fmnist_images):
    """ Each epoch shuffles every image once (whole batches only); (seed, epoch) fixes the batches;
    two processes split an epoch into disjoint halves. """
    images, _ = fmnist_images
    labels = torch.arange(len(images))  # the labels name the images
    augment = DeviceAugment((32, 32), (0.5,), (0.5,), scale=(0.5, 1.0))

    def epoch(loader, number):
        loader.set_epoch(number)
        return [(x, y) for x, y in loader]

    loader = DeviceTrainLoader(images, labels, 32, augment, torch.device('cpu'), seed=7)
    assert len(loader) == 300 // 32
    first = epoch(loader, 0)
    seen = torch.cat([y for _, y in first])
    assert len(seen) == len(loader) * 32 and len(seen.unique()) == len(seen)
    assert first[0][0].shape == (32, 1, 32, 32) and first[0][0].dtype == torch.float32
    again = epoch(DeviceTrainLoader(images, labels, 32, augment, torch.device('cpu'), seed=7), 0)
    assert all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in zip(first, again))
    assert not torch.equal(torch.cat([y for _, y in epoch(loader, 1)]), seen)
    halves = [torch.cat([y for _, y in epoch(
        DeviceTrainLoader(images, labels, 16, augment, torch.device('cpu'), seed=7, num_processes=2,
                          process_index=rank), 0)]) for rank in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == (300 // 2 // 16) * 16
    assert not set(halves[0].tolist()) & set(halves[1].tolist())


@pytest.fixture(scope='module')
def train_module(load_script):
    return load_script('train.py', 'train')


def test_train_py_device_augment(repo_root, subprocess_env, fashion_mnist_root, tmp_path, train_module, capsys):
    """ A GPD run with --device-augment trains, and 1 epoch + resume equals 2 epochs bit for bit;
    --aa, --grad-accum-steps > 1 and a dataset not held in memory are refused in one line. """
    args = train_args(fashion_mnist_root, tmp_path, 'whole', '--gpd', '--device-augment', '--val-holdout', '100',
                      '--precise-bn', '2', epochs=2)
    run_train(repo_root, subprocess_env, args)
    first = train_args(fashion_mnist_root, tmp_path, 'resumed', '--gpd', '--device-augment', '--val-holdout', '100',
                       '--precise-bn', '2', epochs=1)
    run_train(repo_root, subprocess_env, first)
    resume = [a for a in first if a not in ('--experiment', 'resumed')]
    resume[resume.index('--epochs') + 1] = '2'
    run_train(repo_root, subprocess_env, resume + ['--resume', str(tmp_path / 'resumed' / 'last.pth')])
    assert_same_training(tmp_path / 'whole', tmp_path / 'resumed')

    for extra, message in ((['--aa', 'rand-m9'], 'not --aa rand-m9'),
                           (['--grad-accum-steps', '2'], '--device-augment trains with --grad-accum-steps 1')):
        with pytest.raises(SystemExit):
            train_module.parse_args(train_args(fashion_mnist_root, tmp_path, 'x', '--device-augment', *extra))
        assert message in capsys.readouterr().err
    parsed = train_module.parse_args(train_args(fashion_mnist_root, tmp_path, 'x', '--device-augment'))
    data_config = resolve_data_config({'input_size': (1, 32, 32)})
    with pytest.raises(train_module.UsageError, match='--device-augment: object does not hold its images'):
        train_module.device_train_loader(parsed, data_config, object(), 10, None)


def test_loader_cost_benchmark_prints_measured_ratios(load_script, fashion_mnist_root, capsys):
    """ benchmarks/loader_cost.py times the three loaders train.py builds and prints the ratios of
    the times it printed. """
    bench = load_script('benchmarks/loader_cost.py', 'loader_cost_bench')
    assert bench.main(['--data-dir', str(fashion_mnist_root), '--device', 'cpu', '--batch-size', '16',
                       '--workers', '1', '--batches', '2']) == 0
    lines = capsys.readouterr().out.splitlines()
    ms = {line.split()[0]: float(line.split()[1]) for line in lines if 'ms per batch' in line}
    assert set(ms) == {'pil_workers', 'pil_inline', 'device'}
    ratios = {line.split()[0]: float(line.split()[1]) for line in lines if '/device' in line}
    assert set(ratios) == {'pil_workers/device', 'pil_inline/device'}
    for name in ('pil_workers', 'pil_inline'):  # the printed times are rounded to 0.005 ms, the ratio to 0.005
        low = (ms[name] - 0.005) / (ms['device'] + 0.005) - 0.005
        high = (ms[name] + 0.005) / (ms['device'] - 0.005) + 0.005
        assert low <= ratios[f'{name}/device'] <= high
    assert bench.main(['--data-dir', '/nonexistent', '--device', 'cpu']) == 2
    assert 'loader_cost.py: error: cannot open dataset' in capsys.readouterr().err


def test_deterministic_transforms_are_cached_exactly(train_module, fashion_mnist_root, tmp_path):
    """ With --device-augment the evaluation loaders (and with --no-aug the training one) read
    tensors computed once: the very tensors the PIL loaders give. """
    data_config = resolve_data_config({'input_size': (1, 32, 32), 'mean': (0.5,), 'std': (0.5,)})

    def loaders(*extra):
        args = train_module.parse_args(train_args(fashion_mnist_root, tmp_path, 'x', '--val-holdout', '100',
                                                  '--precise-bn', '1', '--no-aug', *extra))
        return train_module.build_loaders(args, data_config, *train_module.build_datasets(args))

    plain, cached = loaders(), loaders('--device-augment')
    for a, b in zip(plain, cached):  # train, val, test, precise-BN
        assert isinstance(b.dataset, torch.utils.data.TensorDataset) and len(a.dataset) == len(b.dataset)
        for i in (0, len(a.dataset) - 1):
            assert torch.equal(a.dataset[i][0], b.dataset[i][0]) and a.dataset[i][1] == b.dataset[i][1]
