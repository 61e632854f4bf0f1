"""AlexNet written the obvious way in plain PyTorch: the baseline that benchmarks compare
against and an independent oracle for tests.

torch.nn.LocalResponseNorm averages the squares (Caffe's form), so the paper's alpha is
multiplied by n here. Layer order equals alexnet.model's, so state dicts are interchangeable:
the paper variants drop fc6's and fc7's outputs, `owt` drops their inputs (torchvision's
order). Dropout is nn.Dropout (scaled in training, the identity at test time), as the
obvious code has it, unless `paper_dropout`: then the section 4.2 form, which keeps units
unscaled in training and multiplies by 0.5 at test time.
"""

import torch
from torch import nn


class _HalvedAtTest(nn.Module):
    """Section 4.2's dropout, p = 0.5, written out."""

    def forward(self, x):
        if self.training:
            return x * (torch.rand_like(x) >= 0.5)
        return x * 0.5


def plain_alexnet(variant: str = "paper", num_classes: int = 1000, input_size: int = 227,
                  paper_dropout: bool = False) -> nn.Module:
    p1 = 2 if input_size == 224 else 0
    if variant == "owt":
        features = [
            nn.Conv2d(3, 64, 11, stride=4, padding=p1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        ]
    elif variant in ("paper", "paper-ungrouped"):
        g = 2 if variant == "paper" else 1
        features = [
            nn.Conv2d(3, 96, 11, stride=4, padding=p1), nn.ReLU(inplace=True),
            nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0), nn.MaxPool2d(3, 2),
            nn.Conv2d(96, 256, 5, padding=2, groups=g), nn.ReLU(inplace=True),
            nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0), nn.MaxPool2d(3, 2),
            nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, 3, padding=1, groups=g), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1, groups=g), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        ]
    elif variant == "bn":
        features = [
            nn.Conv2d(3, 96, 11, stride=4, padding=p1, bias=False), nn.BatchNorm2d(96), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(96, 256, 5, padding=2, groups=2, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(256, 384, 3, padding=1, bias=False), nn.BatchNorm2d(384), nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(384), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
        ]
    else:
        raise ValueError(f"no plain version of variant {variant!r}")
    model = nn.Sequential()
    model.features = nn.Sequential(*features)
    model.flatten = nn.Flatten()
    drop = _HalvedAtTest if paper_dropout else (lambda: nn.Dropout(0.5))
    fc6, fc7, fc8 = nn.Linear(9216, 4096), nn.Linear(4096, 4096), nn.Linear(4096, num_classes)
    if variant == "owt":
        layers = [drop(), fc6, nn.ReLU(inplace=True), drop(), fc7, nn.ReLU(inplace=True), fc8]
    else:
        layers = [fc6, nn.ReLU(inplace=True), drop(), fc7, nn.ReLU(inplace=True), drop(), fc8]
    model.classifier = nn.Sequential(*layers)
    return model
