"""Shared test helpers."""

import torch

from alexnet.checkpoint import save_model
from alexnet.cli import build_parser
from alexnet.dataset import DataStats
from alexnet.model import build_model

# fc6 and fc7 of this many units (model.fc_width) in the networks that tests train and save:
# the paper's layers and wiring with 4.8M parameters instead of 57M (4 classes), so that a
# checkpoint is 39 MB, not 456 MB (the suite writes hundreds). Tests of the paper's own
# sizes, of weight conversion and of export keep the full 4096.
TEST_FC_WIDTH = 256


def run_command(*argv: str) -> int:
    """Runs `alexnet ARGV` through the real parser but without cli.main's error handling,
    so a user error arrives as its exception (cli.main turns it into one line and exit 2)."""
    args = build_parser().parse_args(list(argv))
    return args.func(args)


def model_file_with_statistics(path, variant: str, num_classes: int, fc_width: int = TEST_FC_WIDTH):
    """A model file of `variant` (He-normal weights, seed 0) whose BatchNorm layers have
    statistics of their own, so that eval mode matters, and whose mean image is random;
    returns (model in eval mode, DataStats). Narrow fc layers by default: every layer
    kind is there, at a twentieth of the full network's bytes to write and read."""
    torch.manual_seed(0)
    model = build_model(variant, num_classes=num_classes, init="kaiming", fc_width=fc_width)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-20, 20)
            m.running_var.uniform_(100, 4000)
    stats = DataStats(torch.rand(3, 256, 256) * 255, torch.ones(3), torch.eye(3))
    preprocess = {"image_size": 256, "crop": model.cfg.input_size, "pixel_scale": 1.0}
    classes = [f"n0000{i}" for i in range(num_classes)]
    save_model(path, model, classes, stats, preprocess, {"class_names": [f"class {i}" for i in range(num_classes)]})
    return model.eval(), stats


def crops_and_inputs(stats, crop: int, batch: int, seed: int, pixel_scale: float = 1.0):
    """Random 256x256 uint8 images: their centre crops (what the exported graph takes) and
    the network's input made of them by our own EvalTransform (mean image subtracted)."""
    from alexnet.augment import EvalTransform, center_crop

    images = torch.randint(0, 256, (batch, 3, 256, 256), generator=torch.Generator().manual_seed(seed),
                           dtype=torch.uint8)
    return center_crop(images, crop).float(), EvalTransform(stats, crop, scale=pixel_scale)(images)
