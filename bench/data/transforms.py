"""Image transforms of SPEC section 2, sized for any input resolution."""
from __future__ import annotations

from bench.data.errors import DataError

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def build_transforms(image_size: int, mean, std, *, train: bool, interpolation: str = "bilinear"):
    """Train: RandomResizedCrop + horizontal flip. Test: Resize(size * 256/224) + CenterCrop.

    Both end in ToTensor + Normalize(mean, std); mean and std are the backbone's own
    (timm ``pretrained_cfg``), passed by the caller.
    """
    # Imported here so that indexing datasets does not pay for loading torchvision.
    from torchvision import transforms

    if interpolation not in INTERPOLATIONS:
        raise DataError(f"interpolation {interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
    mode = transforms.InterpolationMode(interpolation)
    finish = [transforms.ToTensor(), transforms.Normalize(mean=list(mean), std=list(std))]
    if train:
        return transforms.Compose([
            transforms.RandomResizedCrop(image_size, interpolation=mode),
            transforms.RandomHorizontalFlip(),
            *finish,
        ])
    # The ViT convention: resize the short side to 256 for a 224 crop, scaled to image_size.
    return transforms.Compose([
        transforms.Resize(round(image_size * 256 / 224), interpolation=mode),
        transforms.CenterCrop(image_size),
        *finish,
    ])
