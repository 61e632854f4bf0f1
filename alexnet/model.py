"""The network of Krizhevsky, Sutskever & Hinton (2012), section 3 and Figure 2, and its
well-known variants.

  paper            the paper's network; the two-GPU wiring is groups=2 in conv2, conv4,
                   conv5 (their kernels see only the maps "on the same GPU"), conv3 and
                   the FC layers are all-to-all. 60,965,224 parameters.
  paper-ungrouped  the same widths with every layer all-to-all. 62,378,344 parameters.
  owt              "One weird trick" (Krizhevsky 2014): 64-192-384-256-256, no LRN, with
                   torchvision's parameter names and shapes. 61,100,840 parameters.
  bn               `paper` with BatchNorm after every convolution (before its ReLU) in
                   place of LRN; those convolutions lose their now redundant biases.

Module names follow torchvision (`features`, `classifier`, indices inside), so a
torchvision state dict loads into `build_model("owt")` as it is and computes the same
outputs (that config has torchvision's 224 input and inverted dropout); the paper's layer
names (conv1 ... fc8) come from `named_layers()`.

Speed: each ReLU -> (LRN) -> max-pool run in `features` goes through one fused kernel
(`alexnet.lrn.relu_lrn_pool`) when the activations are float32 or bfloat16 channels_last
CPU tensors; otherwise, when `model.fuse` is False, or when a hook is registered on one of those
modules (to look at its output), the modules run one by one with the same results.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from alexnet.config import ModelConfig, model_config
from alexnet.lrn import LocalResponseNorm, block_fusable, relu_lrn_pool


def _conv_block(cfg: ModelConfig, name: str, cin: int, cout: int, kernel: int, stride: int = 1,
                padding: int = 0, groups: int = 1) -> list[tuple[str, nn.Module]]:
    """conv -> (BN) -> ReLU, named as in the paper."""
    i = name[-1]
    bn = cfg.variant == "bn"
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=not bn)
    layers: list[tuple[str, nn.Module]] = [(name, conv)]
    if bn:
        layers.append((f"bn{i}", nn.BatchNorm2d(cout)))
    layers.append((f"relu{i}", nn.ReLU(inplace=True)))
    return layers


def _features(cfg: ModelConfig) -> list[tuple[str, nn.Module]]:
    """The convolutional part. Shapes in comments are for one image."""
    p1 = cfg.conv1_padding
    if cfg.variant == "owt":
        return [
            *_conv_block(cfg, "conv1", 3, 64, 11, stride=4, padding=p1),  # (64, 55, 55)
            ("pool1", nn.MaxPool2d(3, 2)),  # (64, 27, 27)
            *_conv_block(cfg, "conv2", 64, 192, 5, padding=2),  # (192, 27, 27)
            ("pool2", nn.MaxPool2d(3, 2)),  # (192, 13, 13)
            *_conv_block(cfg, "conv3", 192, 384, 3, padding=1),  # (384, 13, 13)
            *_conv_block(cfg, "conv4", 384, 256, 3, padding=1),  # (256, 13, 13)
            *_conv_block(cfg, "conv5", 256, 256, 3, padding=1),  # (256, 13, 13)
            ("pool5", nn.MaxPool2d(3, 2)),  # (256, 6, 6)
        ]
    g = 1 if cfg.variant == "paper-ungrouped" else 2  # the two GPUs of section 3.2
    lrn = cfg.variant != "bn"
    return [
        # "96 kernels of size 11x11x3 with a stride of 4 pixels" (section 3.5)
        *_conv_block(cfg, "conv1", 3, 96, 11, stride=4, padding=p1),  # (96, 55, 55)
        *([("norm1", LocalResponseNorm(cfg.lrn))] if lrn else []),  # section 3.3
        ("pool1", nn.MaxPool2d(3, 2)),  # (96, 27, 27) overlapping pooling, s=2, z=3 (section 3.4)
        # "256 kernels of size 5x5x48": each half sees the 48 maps on its own GPU
        *_conv_block(cfg, "conv2", 96, 256, 5, padding=2, groups=g),  # (256, 27, 27)
        *([("norm2", LocalResponseNorm(cfg.lrn))] if lrn else []),
        ("pool2", nn.MaxPool2d(3, 2)),  # (256, 13, 13)
        # "384 kernels of size 3x3x256 connected to the (normalized, pooled) outputs": all-to-all
        *_conv_block(cfg, "conv3", 256, 384, 3, padding=1),  # (384, 13, 13)
        # "384 kernels of size 3x3x192"
        *_conv_block(cfg, "conv4", 384, 384, 3, padding=1, groups=g),  # (384, 13, 13)
        # "256 kernels of size 3x3x192"
        *_conv_block(cfg, "conv5", 384, 256, 3, padding=1, groups=g),  # (256, 13, 13)
        ("pool5", nn.MaxPool2d(3, 2)),  # (256, 6, 6)
    ]


def _classifier(cfg: ModelConfig) -> list[tuple[str, nn.Module]]:
    """The fully-connected part. Section 4.2 drops "the output of each hidden neuron" of
    "the first two fully-connected layers": after relu6 and relu7. `owt` keeps torchvision's
    order instead (dropout before fc6 and before fc7), and with it torchvision's indices."""
    w = cfg.fc_width  # "The fully-connected layers have 4096 neurons each" (section 3.5)
    fc6, fc7 = ("fc6", nn.Linear(256 * 6 * 6, w)), ("fc7", nn.Linear(w, w))  # (w,) each
    fc8 = ("fc8", nn.Linear(w, cfg.num_classes))  # (num_classes,) logits; softmax is in the loss
    relu6, relu7 = ("relu6", nn.ReLU(inplace=True)), ("relu7", nn.ReLU(inplace=True))
    drop6, drop7 = (("drop6", Dropout(cfg.dropout, cfg.dropout_form)),
                    ("drop7", Dropout(cfg.dropout, cfg.dropout_form)))
    if cfg.variant == "owt":
        return [drop6, fc6, relu6, drop7, fc7, relu7, fc8]
    return [fc6, relu6, drop6, fc7, relu7, drop7, fc8]


class Dropout(nn.Dropout):
    """Dropout in one of two forms, the same network in expectation but not in training:

    "paper" (section 4.2): in training each unit is zeroed with probability p and the kept
    ones pass unchanged; at test time every unit passes, multiplied by 1 - p ("we use all
    the neurons but multiply their outputs by 0.5").
    "inverted" (nn.Dropout, Caffe, torchvision): the kept units are multiplied by 1 / (1 - p)
    in training and the test pass is the identity. Weights trained this way (BVLC's,
    torchvision's) need this form.

    A network trained with the inverted form equals a paper-form one whose next layer has
    twice the weights; from the same N(0, 0.01) start and learning rate the two train
    differently (in the paper's units, the inverted form doubles the start of fc7 and fc8
    and quadruples their steps)."""

    def __init__(self, p: float = 0.5, form: str = "paper"):
        super().__init__(p)
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "inverted" or self.p == 0:
            return super().forward(x)
        if self.training:
            return x * torch.empty_like(x).bernoulli_(1 - self.p)
        return x * (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, form={self.form}"


class AlexNet(nn.Module):
    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = cfg or ModelConfig()
        features, classifier = _features(self.cfg), _classifier(self.cfg)
        self.features = nn.Sequential(*(m for _, m in features))
        self.classifier = nn.Sequential(*(m for _, m in classifier))
        self._names = [n for n, _ in features] + [n for n, _ in classifier]
        self.fuse = True
        self.reset_parameters()

    def named_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """(paper name, module) for every layer in order: conv1, relu1, norm1, pool1, ..., fc8."""
        yield from zip(self._names, [*self.features, *self.classifier])

    def layer(self, name: str) -> nn.Module:
        for n, m in self.named_layers():
            if n == name:
                return m
        raise KeyError(f"no layer {name!r}; layers: {', '.join(self._names)}")

    def reset_parameters(self) -> None:
        """Section 5: weights from N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7, else 0.
        With `init="kaiming"`: He-normal weights (fan-in, ReLU gain) but N(0, 0.01) in fc8, biases 0."""
        kaiming = self.cfg.init == "kaiming"
        for name, m in self.named_layers():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if kaiming and name != "fc8":
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                else:
                    nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)
                if m.bias is not None:
                    one = not kaiming and name in self.cfg.init_bias_one
                    nn.init.constant_(m.bias, 1.0 if one else 0.0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.cfg.input_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(f"{self.cfg.variant} AlexNet with input_size={s} expects (N, 3, {s}, {s}) "
                             f"images, got {tuple(x.shape)}")
        x = self._features(x)  # (N, 256, 6, 6)
        x = torch.flatten(x, 1)  # (N, 9216)
        return self.classifier(x)  # (N, num_classes)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fuse or not _is_cl(x) or _hooked([self.features]):
            return self.features(x)  # (a hook on the Sequential itself: it must be called)
        # the plan is read off the layers as they are now (a few dozen Python steps): a layer
        # swapped or an LRN's cfg changed after building is honoured as on the NCHW path
        i, layers = 0, list(self.features)
        blocks = _fusable_blocks(self.features)
        while i < len(layers):
            block = blocks.get(i)
            if block is not None and block_fusable(x) and not _hooked(layers[i:block[0]]):
                end, lrn, pool = block
                x = relu_lrn_pool(x, lrn, pool)
                i = end
            else:
                x = layers[i](x)
                i += 1
        return x

    def get_num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _is_cl(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _fusable_blocks(features: nn.Sequential) -> dict[int, tuple[int, object, tuple[int, int]]]:
    """{index of a ReLU: (index after its max-pool, LRN config or None, (z, s))} for every
    ReLU -> [LRN] -> MaxPool2d run whose pool has no padding, dilation or ceil mode."""
    layers, blocks = list(features), {}
    for i, m in enumerate(layers):
        if not isinstance(m, nn.ReLU):
            continue
        j, lrn = i + 1, None
        if j < len(layers) and isinstance(layers[j], LocalResponseNorm):
            lrn, j = layers[j].cfg, j + 1
        if j < len(layers) and isinstance(layers[j], nn.MaxPool2d):
            p = layers[j]
            z, s = p.kernel_size, p.stride
            if (isinstance(z, int) and isinstance(s, int) and p.padding == 0 and p.dilation == 1
                    and not p.ceil_mode and not p.return_indices):
                blocks[i] = (j + 1, lrn, (z, s))
    return blocks


def _hooked(modules: list[nn.Module]) -> bool:
    from torch.nn.modules import module as _m

    if _m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)


def build_model(variant: str = "paper", **overrides) -> AlexNet:
    """`build_model("paper", num_classes=10)`: a variant by name with config overrides."""
    return AlexNet(model_config(variant, **overrides))
