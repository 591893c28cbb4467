"""Image transforms: float [H, W] in [0, 1] -> normalised FloatTensor [3, S, S].

torchvision.transforms.v2 by default; `DATA['use_albumentations']` swaps in a stronger
training pipeline (adds rotation, gamma, blur/noise). The default leaves rotation out:
a rotation is a grid_sample, which alone costs more than the rest of the pipeline on a
CPU, while the random resized crop already varies position and scale. Evaluation is
always the same deterministic resize, whatever trained the model. Horizontal flips are
off unless asked for: the heart is on the patient's left.

Every path, the cache included, starts with `fit_square`: a non-square image (CheXpert's
390 x 320) keeps its aspect ratio and is padded, so it is trained and scored in one geometry.

Volumes (DATA.spatial_dims=3) take the same road in 3D: `fit_volume` into DATA.volume_size, one
channel, values left in [0, 1] (no ImageNet statistics: 3D backbones start from scratch or from their
own weights). Training augments with MONAI: half the volumes get a small random affine (rotation up to
0.05 rad, about 3 degrees, about each axis; scale +-5 %; shift up to 5 % of each side: twice that kept
the 3D quickstart's training loss flat), then intensity scale/shift. No
flip along D (head/feet) or H (front/back): no anatomy is upside down or back to front. The left-right
flip (W) is off unless DATA.horizontal_flip: it swaps the heart's, liver's and spleen's sides.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from hybridmednet.config import Config
from hybridmednet.data.volumes import INSTALL_3D, resize_volume
from hybridmednet.errors import ConfigError

# Grey is copied to 3 channels and normalised with ImageNet statistics, as timm backbones expect.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """float [H, W] -> FloatTensor [1, H, W], [D, H, W] -> [1, D, H, W] (shares memory)."""
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]


def grey_to_rgb(image: torch.Tensor) -> torch.Tensor:
    return image.expand(3, -1, -1)


def fit_square(image: np.ndarray | torch.Tensor, size: int) -> np.ndarray | torch.Tensor:
    """[..., H, W] -> [..., size, size]: antialiased resize of the longer side to `size`, aspect
    ratio kept, the rest padded with 0 (black), centred. Arrays come back as float32 arrays."""
    is_array = isinstance(image, np.ndarray)
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)) if isinstance(image, np.ndarray) else image
    h, w = tensor.shape[-2:]
    if (h, w) != (size, size):
        top, left, new_h, new_w = square_box(h, w, size)
        resized = F.interpolate(
            tensor.reshape(-1, 1, h, w), size=(new_h, new_w), mode='bilinear', antialias=True, align_corners=False
        )
        padded = F.pad(resized, (left, size - new_w - left, top, size - new_h - top))
        tensor = padded.reshape(*tensor.shape[:-2], size, size)
    return tensor.numpy() if is_array else tensor


def fit_volume(volume: torch.Tensor, size: list[int] | tuple[int, ...]) -> torch.Tensor:
    """[C, D, H, W] -> [C, *size]: fit_square in 3D. Resized (anti-aliased) by one factor so the volume fits,
    aspect ratio kept, the rest padded with 0, centred."""
    shape = volume.shape[1:]
    scale = min(s / n for s, n in zip(size, shape))
    fitted = [min(s, max(1, round(n * scale))) for s, n in zip(size, shape)]
    resized = resize_volume(volume, fitted)
    pad = [(s - f) // 2 for s, f in zip(size, fitted)]
    return F.pad(resized, [p for d in (2, 1, 0) for p in (pad[d], size[d] - fitted[d] - pad[d])])


def square_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of an image inside its fit_square output: what to crop from a
    model-sized map (a heatmap) to lay it back over the original image."""
    new_h, new_w = max(1, round(height * size / max(height, width))), max(1, round(width * size / max(height, width)))
    return (size - new_h) // 2, (size - new_w) // 2, new_h, new_w


def normalization(config: Config) -> tuple[list[float], list[float]]:
    """(mean, std) the backbone's weights expect: DATA.mean/std, which training fills from the backbone's
    pretrained config; configs written before that (None) were trained with ImageNet statistics."""
    return list(config.DATA['mean'] or MEAN), list(config.DATA['std'] or STD)


def build_transforms(config: Config, train: bool) -> Callable[[np.ndarray], torch.Tensor]:
    """The pipeline for one split; picklable, so DataLoader workers can use it."""
    if config.DATA['spatial_dims'] == 3:
        return VolumePipeline(config.DATA['volume_size'], train, config.DATA['horizontal_flip'])
    size = config.DATA['image_size']
    tail = [v2.Lambda(grey_to_rgb), v2.Normalize(*normalization(config))]
    if train and config.DATA['use_albumentations']:
        return _AlbumentationsPipeline(size, config.DATA['horizontal_flip'], v2.Compose(tail))
    if not train:
        return v2.Compose([v2.Lambda(to_tensor), v2.Lambda(partial(fit_square, size=size)), *tail])
    flip = [v2.RandomHorizontalFlip()] if config.DATA['horizontal_flip'] else []
    return v2.Compose(
        [
            v2.Lambda(to_tensor),
            # Antialiased resize to 8/7 of the size once (a no-op on a 256 px cache at 224 px),
            # then a crop that rescales by at most ~1.3x needs no antialiasing: half the cost.
            v2.Lambda(partial(fit_square, size=round(size * 8 / 7))),
            v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.9, 1.1), antialias=False),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
            *flip,
            *tail,
        ]
    )


class _AlbumentationsPipeline:
    """Stronger training augmentation (rotation, gamma, blur/noise) on the float image."""

    def __init__(self, size: int, flip: bool, tail: Callable[[torch.Tensor], torch.Tensor]):
        try:
            import albumentations as A
        except ImportError:
            raise ConfigError(
                "DATA.use_albumentations needs albumentations: pip install 'hybridmednet[albumentations]'"
            ) from None
        self.letterbox = round(size * 8 / 7)  # as the default pipeline: fit_square, then crop
        self.pipeline = A.Compose(
            [
                A.RandomResizedCrop(size=(size, size), scale=(0.7, 1.0), ratio=(0.85, 1.15)),
                A.Affine(rotate=(-10, 10), translate_percent=(-0.06, 0.06), scale=(0.9, 1.1), p=0.7),
                A.RandomBrightnessContrast(brightness_limit=0.25, contrast_limit=0.25, p=0.8),
                A.RandomGamma(gamma_limit=(80, 120), p=0.3),
                A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.GaussNoise(std_range=(0.01, 0.04))], p=0.3),
                *([A.HorizontalFlip()] if flip else []),
            ]
        )
        self.tail = tail

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        # Albumentations keeps its own random stream: draw its seed from torch's, so that seeding torch
        # (per image, ChestXrayDataset.set_epoch) makes this pipeline repeatable like torchvision's.
        self.pipeline.set_random_seed(int(torch.randint(2**31 - 1, ())))
        out = self.pipeline(image=fit_square(np.asarray(image, dtype=np.float32), self.letterbox))['image']
        return self.tail(to_tensor(np.clip(out, 0.0, 1.0)))


class VolumePipeline:
    """float [D, H, W] in [0, 1] -> FloatTensor [1, *size]; training adds MONAI's augmentation (module docstring)."""

    def __init__(self, size: list[int], train: bool, flip: bool):
        self.size = list(size)
        self.augment = None
        if train:
            try:
                from monai.transforms import Compose, RandAffine, RandFlip, RandScaleIntensity, RandShiftIntensity
            except ImportError:
                raise ConfigError(f'DATA.spatial_dims=3 needs MONAI: {INSTALL_3D}') from None
            self.augment = Compose(
                [
                    RandAffine(
                        prob=0.5,
                        rotate_range=(0.05, 0.05, 0.05),
                        scale_range=(0.05, 0.05, 0.05),
                        translate_range=[0.05 * s for s in self.size],
                        mode='bilinear',
                        padding_mode='zeros',
                    ),
                    RandScaleIntensity(factors=0.1, prob=0.5),
                    RandShiftIntensity(offsets=0.05, prob=0.5),
                    *([RandFlip(prob=0.5, spatial_axis=2)] if flip else []),  # W: left <-> right
                ]
            )

    def __call__(self, volume: np.ndarray) -> torch.Tensor:
        x = fit_volume(to_tensor(volume), self.size)
        if self.augment is None:
            return x
        # MONAI keeps its own random stream: seed it from torch's, so that seeding torch per volume
        # (ChestXrayDataset.set_epoch) makes the augmentation repeatable, as for 2D.
        self.augment.set_random_state(int(torch.randint(2**31 - 1, ())))
        return torch.Tensor.as_subclass(self.augment(x), torch.Tensor)  # MONAI's MetaTensor -> a plain tensor
