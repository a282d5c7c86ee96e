"""Training augmentation on the training device, for datasets held in memory as one uint8 tensor.

torchvision's MNIST, Fashion-MNIST and CIFAR keep every image in one array. With images this
small, a GPU trains a batch faster than data loader workers can run timm's per-image PIL
transforms (random resized crop, flip, color jitter: ~0.3 ms per image per core), and the
workers take the cores that launch the GPU's kernels. ``train.py --device-augment`` moves the
whole training set to the device once and draws the same augmentations there, a batch at a
time, with per-image parameters drawn like timm's transforms draw them:

* random resized crop: timm's ``RandomResizedCropAndInterpolation.get_params`` (10 tries of area
  and log-aspect, else a central crop), the crop resampled with ``grid_sample`` (bilinear,
  bicubic or nearest; within one gray level of torchvision's PIL crop-then-resize when a crop is
  upscaled, as these datasets' crops are; no antialiasing where a crop is larger than the
  output, and torch's bicubic kernel is not PIL's);
* horizontal flip with probability ``hflip``;
* color jitter (brightness, contrast, saturation) in a random order per image, each cut to 8
  bits as PIL's blends cut; saturation leaves a 1-channel image as it is, as PIL does;
* normalization, then timm's ``RandomErasing`` on the device (as timm's prefetcher runs it).

The results follow the same distributions as the PIL pipeline but are not the same pixels:
runs compare with runs made the same way. Evaluation is unchanged: its transforms are
deterministic, so :func:`cached_transform` runs them once on the CPU and keeps the tensors.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ['DeviceAugment', 'DeviceTrainLoader', 'images_of', 'cached_transform']

_INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest')
# PIL's 'L' conversion (ITU-R 601-2 luma in 16-bit fixed point, rounded), the grayscale that
# contrast and saturation blend with
_LUMA_FIXED = (19595, 38470, 7471)


def images_of(dataset, in_chans: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, in_chans, H, W], int64 labels [N]) of a dataset that holds them in memory
    (``data`` and ``targets``, as torchvision's MNIST / Fashion-MNIST / CIFAR do)."""
    data, targets = getattr(dataset, 'data', None), getattr(dataset, 'targets', None)
    if data is None or targets is None:
        raise ValueError(f'{type(dataset).__name__} does not hold its images in memory as one array '
                         '(`data` and `targets`, as torchvision\'s MNIST, Fashion-MNIST and CIFAR do)')
    images = torch.as_tensor(data)
    if images.dtype != torch.uint8:
        raise ValueError(f'{type(dataset).__name__}.data holds {images.dtype}, expected 8-bit images')
    if images.ndim == 3:  # N, H, W: grayscale
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):  # N, H, W, C
        images = images.permute(0, 3, 1, 2)
    else:
        raise ValueError(f'{type(dataset).__name__}.data has shape {tuple(images.shape)}: expected '
                         'N x H x W or N x H x W x C (C = 1 or 3)')
    if images.shape[1] != in_chans:
        if in_chans == 3:  # PIL's convert('RGB') of a grayscale image repeats it
            images = images.expand(-1, 3, -1, -1)
        elif in_chans == 1:  # PIL's convert('L')
            images = _luma(images.float()).to(torch.uint8)
        else:
            raise ValueError(f'cannot turn {images.shape[1]}-channel images into {in_chans} channels')
    return images.contiguous(), torch.as_tensor(targets, dtype=torch.long)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """8-bit [B, 3, H, W] -> its 8-bit grayscale [B, 1, H, W], exactly as PIL converts (the sums
    stay below 2**24: exact in float32); a 1-channel image is its own grayscale."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_LUMA_FIXED, dtype=x.dtype, device=x.device)
    return torch.floor(((x * w[:, None, None]).sum(1, keepdim=True) + 32768) / 65536)


def crop_params(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                generator: torch.Generator) -> torch.Tensor:
    """[n, 4] integer (top, left, crop height, crop width), drawn per image as timm's
    ``RandomResizedCropAndInterpolation.get_params`` draws them (10 tries, then a central crop)."""
    tries = 10
    area = height * width
    u = torch.rand(n, tries, 4, generator=generator, dtype=torch.float64)
    target_area = (scale[0] + (scale[1] - scale[0]) * u[..., 0]) * area
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w <= width) & (h <= height)
    # the first try that fits (argmax of a bool row is its first True)
    first = fits.to(torch.int8).argmax(dim=1)
    pick = lambda t: t.gather(1, first[:, None])[:, 0]  # noqa: E731
    h, w = pick(h), pick(w)
    # randint(0, room) inclusive, from the chosen try's own uniforms
    top = torch.floor(pick(u[..., 2]) * (height - h + 1)).clamp(max=height - h)
    left = torch.floor(pick(u[..., 3]) * (width - w + 1)).clamp(max=width - w)
    # no try fits: timm's central crop, the aspect clamped into `ratio`
    in_ratio = width / height
    if in_ratio < min(ratio):
        fh, fw = round(width / min(ratio)), width
    elif in_ratio > max(ratio):
        fh, fw = height, round(height * max(ratio))
    else:
        fh, fw = height, width
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=torch.float64)
    params = torch.stack([top, left, h, w], dim=1)
    params = torch.where(fits.any(dim=1, keepdim=True), params, fallback)
    return params.long()


class DeviceAugment:
    """timm's training transform (random resized crop, flip, color jitter, normalize, random
    erasing) on a batch of uint8 images already on the device; parameters come from a CPU
    generator, so a seed gives the same augmentations on any device."""

    def __init__(
            self,
            size: Tuple[int, int],
            mean: Sequence[float],
            std: Sequence[float],
            scale: Sequence[float] = (0.08, 1.0),
            ratio: Sequence[float] = (3. / 4., 4. / 3.),
            interpolation: str = 'bilinear',
            hflip: float = 0.5,
            color_jitter: Optional[float] = 0.4,
            random_erasing=None,
    ):
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f'--device-augment resamples with one of {", ".join(_INTERPOLATIONS)}, '
                             f'not {interpolation!r}')
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f'random resized crop scale must be two numbers 0 < lo <= hi, got {list(scale)}')
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f'random resized crop ratio must be two numbers 0 < lo <= hi, got {list(ratio)}')
        self.size = tuple(size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation = interpolation
        self.hflip = hflip
        self.jitter = float(color_jitter or 0.0)
        self.random_erasing = random_erasing

    def _resized_crops(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, height, width = images.shape
        top, left, h, w = crop_params(n, height, width, self.scale, self.ratio, generator).double().unbind(1)
        flip = torch.rand(n, generator=generator, dtype=torch.float64) < self.hflip
        out_h, out_w = self.size
        # each output pixel's center in input pixels (align_corners=False on both sides), kept
        # inside the crop: torchvision crops, then resizes, so the crop's edge pixels repeat
        rows = torch.arange(out_h, dtype=torch.float64)
        cols = torch.arange(out_w, dtype=torch.float64)
        cols = torch.where(flip[:, None], out_w - 1 - cols, cols)
        y = (top[:, None] + (rows + 0.5) * h[:, None] / out_h - 0.5).clamp(top[:, None], (top + h - 1)[:, None])
        x = (left[:, None] + (cols + 0.5) * w[:, None] / out_w - 0.5).clamp(left[:, None], (left + w - 1)[:, None])
        grid = torch.stack(torch.broadcast_tensors(
            ((2 * x + 1) / width - 1)[:, None, :], ((2 * y + 1) / height - 1)[:, :, None]), dim=-1)
        pixels = images.float()
        out = F.grid_sample(pixels, grid.to(device=pixels.device, dtype=pixels.dtype), mode=self.interpolation,
                            padding_mode='border', align_corners=False)
        return out.clamp(0, 255).round()  # PIL resamples into 8-bit pixels

    def _color_jitter(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """torchvision's ColorJitter(j, j, j) on PIL images: each image's three factors from
        [1 - j, 1 + j], applied in a random order, each result cut to 8 bits."""
        n = x.shape[0]
        lo, hi = max(0.0, 1 - self.jitter), 1 + self.jitter
        factors = (lo + (hi - lo) * torch.rand(n, 3, generator=generator)).to(x)
        order = torch.rand(n, 3, generator=generator).argsort(dim=1).to(x.device)

        def brightness(t, f):  # blend with black
            return t * f
        def contrast(t, f):  # blend with the image's mean gray level, rounded half up as PIL does
            mean = torch.floor(_luma(t).mean(dim=(1, 2, 3), keepdim=True) + 0.5)
            return mean + f * (t - mean)
        def saturation(t, f):  # blend with the image's own grayscale (a no-op on one channel)
            gray = _luma(t)
            return gray + f * (t - gray)

        ops = (brightness, contrast, saturation)
        for position in range(3):
            for index, op in enumerate(ops):
                chosen = (order[:, position] == index)[:, None, None, None]
                f = factors[:, index][:, None, None, None]
                x = torch.where(chosen, op(x, f).clamp(0, 255).floor(), x)  # PIL's blend truncates
        return x

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 [B, C, H, W] on the device -> normalized float [B, C, *size]."""
        x = self._resized_crops(images, generator)
        if self.jitter > 0:
            x = self._color_jitter(x, generator)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype)[:, None, None] * 255
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype)[:, None, None] * 255
        x = (x - mean) / std
        if self.random_erasing is not None:
            x = self.random_erasing(x)
        return x


class DeviceTrainLoader:
    """Shuffled training batches of in-memory images, augmented on the device.

    The order and the augmentations of an epoch depend only on (seed, epoch): a resumed run draws
    what an uninterrupted one would. With several processes each takes every num_processes-th
    image of the shuffled order (whole batches only, as the training loader drops the last one).
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, batch_size: int, augment: DeviceAugment,
                 device: torch.device, seed: int = 0, num_processes: int = 1, process_index: int = 0):
        self.dataset = torch.utils.data.TensorDataset(images, targets)  # len() for the logs
        self.images = images.to(device)
        self.targets = targets.to(device)
        self.batch_size = batch_size
        self.augment = augment
        self.seed = seed
        self.num_processes, self.process_index = num_processes, process_index
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset) // self.num_processes // self.batch_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator)
        per_process = len(self.dataset) // self.num_processes
        order = order[:per_process * self.num_processes][self.process_index::self.num_processes]
        order = order.to(self.images.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            yield self.augment(self.images[index], generator), self.targets[index]


def cached_transform(dataset) -> torch.utils.data.TensorDataset:
    """The (image, label) pairs of ``dataset`` (whose transform is deterministic, e.g. timm's eval
    transform) computed once: later epochs read the tensors instead of transforming again."""
    pairs = [dataset[i] for i in range(len(dataset))]
    if not pairs:
        raise ValueError('no image to cache')
    return torch.utils.data.TensorDataset(
        torch.stack([x for x, _ in pairs]), torch.tensor([int(y) for _, y in pairs], dtype=torch.long))
