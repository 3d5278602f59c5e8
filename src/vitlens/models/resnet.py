"""ResNets (He et al. 2016), the CNN baseline.

Module names equal torchvision's (conv1, bn1, layer1..layer4, fc; blocks with conv1/bn1/...,
downsample.0/1), so torchvision and timm ResNet state dicts load as they are.
Two stems: 'imagenet' (7x7 stride 2 + max-pool) and 'cifar' (3x3 stride 1, no pool) for
32 px images, where the ImageNet stem would throw away 4x of an already tiny image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import ModelError
from .inputs import check_image_batch, model_label
from .registry import register_models


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None,
                 base_width: int = 64):
        super().__init__()
        if base_width != 64:
            raise ModelError("base_width (wide ResNets) needs block='bottleneck'")
        self.conv1, self.bn1 = conv3x3(cin, width, stride), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(width, width), nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride here, torchvision's 'ResNet v1.5') -> 1x1 expand.

    ``base_width`` 128 doubles the inner width but not the output (wide ResNets, Zagoruyko &
    Komodakis 2016, as torchvision's ``wide_resnet50_2``).
    """

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None,
                 base_width: int = 64):
        super().__init__()
        inner = width * base_width // 64
        self.conv1, self.bn1 = conv1x1(cin, inner), nn.BatchNorm2d(inner)
        self.conv2, self.bn2 = conv3x3(inner, inner, stride), nn.BatchNorm2d(inner)
        self.conv3, self.bn3 = conv1x1(inner, width * 4), nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


@dataclass
class ResNetConfig:
    block: str = "basic"  # 'basic' | 'bottleneck'
    layers: tuple[int, ...] = (2, 2, 2, 2)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    base_width: int = 64  # bottleneck inner width per 64 of ``widths``: 128 for wide ResNets
    stem: str = "imagenet"  # 'imagenet' | 'cifar'
    in_chans: int = 3
    num_classes: int = 1000
    drop_rate: float = 0.0
    zero_init_residual: bool = False  # last BN of each block starts at 0 (Goyal et al. 2017)

    def __post_init__(self):
        if self.block not in ("basic", "bottleneck"):
            raise ModelError(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        if self.stem not in ("imagenet", "cifar"):
            raise ModelError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        if len(self.layers) != len(self.widths):
            raise ModelError(f"layers {self.layers} and widths {self.widths} must have the same length")
        self.layers, self.widths = tuple(self.layers), tuple(self.widths)


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        block = BasicBlock if cfg.block == "basic" else Bottleneck
        w0 = cfg.widths[0]
        if cfg.stem == "imagenet":
            self.conv1 = nn.Conv2d(cfg.in_chans, w0, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(cfg.in_chans, w0)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU(inplace=True)
        cin = w0
        for i, (n, width) in enumerate(zip(cfg.layers, cfg.widths)):
            stride = 1 if i == 0 else 2
            stage, cin = self._make_stage(block, cin, width, n, stride, cfg.base_width)
            self.add_module(f"layer{i + 1}", stage)
        self.num_features = cin
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.fc = nn.Linear(cin, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights(zero_init_residual=cfg.zero_init_residual)

    @staticmethod
    def _make_stage(block, cin: int, width: int, n: int, stride: int, base_width: int):
        cout = width * block.expansion
        downsample = None
        if stride != 1 or cin != cout:  # projection shortcut ("option B")
            downsample = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
        blocks = [block(cin, width, stride, downsample, base_width)]
        blocks += [block(cout, width, base_width=base_width) for _ in range(n - 1)]
        return nn.Sequential(*blocks), cout

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                last_bn = getattr(m, "bn3", None) or getattr(m, "bn2", None)
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(last_bn.weight)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.cfg.layers))]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, self.cfg.in_chans, model_label(self))
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages:
            x = stage(x)
        return x  # (B, C, h, w)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(torch.flatten(self.avgpool(x), 1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def config_dict(self) -> dict:
        return asdict(self.cfg)


# -- the registered variants ------------------------------------------------------------------
_CIFAR = dict(stem="cifar", num_classes=10)  # CIFAR ResNets: 3x3 stem, no max-pool

register_models(ResNet, ResNetConfig, {
    # torchvision layout (ImageNet stem), equal to torchvision's models of the same names
    "resnet18": dict(block="basic", layers=(2, 2, 2, 2)),
    "resnet34": dict(block="basic", layers=(3, 4, 6, 3)),
    "resnet50": dict(block="bottleneck", layers=(3, 4, 6, 3)),
    "resnet101": dict(block="bottleneck", layers=(3, 4, 23, 3)),
    "resnet152": dict(block="bottleneck", layers=(3, 8, 36, 3)),
    "wide_resnet50_2": dict(block="bottleneck", layers=(3, 4, 6, 3), base_width=128),
    "wide_resnet101_2": dict(block="bottleneck", layers=(3, 4, 23, 3), base_width=128),
    # the widely used CIFAR ResNet-18 (64-512 wide, 11M parameters)
    "resnet18_cifar": dict(_CIFAR, block="basic", layers=(2, 2, 2, 2)),
    # He et al.'s CIFAR ResNet-20/56: three stages of 3 (9) blocks, 16/32/64 channels
    "resnet20": dict(_CIFAR, block="basic", layers=(3, 3, 3), widths=(16, 32, 64)),
    "resnet56": dict(_CIFAR, block="basic", layers=(9, 9, 9), widths=(16, 32, 64)),
    # a small, fast CIFAR ResNet (3 stages x 1 block, 32/64/128) for the quickstart on a CPU
    "resnet8_cifar": dict(_CIFAR, block="basic", layers=(1, 1, 1), widths=(32, 64, 128)),
})
