"""ResNet-9, the fast CIFAR-10 ResNet of David Page's DAWNBench entry ("How to train your ResNet", 2018).

Reading order: conv-BN-act unit -> residual pair -> the network (prep, three stages, max-pool head).

    prep    conv 3->64                          32 x 32
    layer1  conv 64->128, max-pool, residual    16 x 16   (residual = two conv units, added back)
    layer2  conv 128->256, max-pool              8 x 8
    layer3  conv 256->512, max-pool, residual    4 x 4
    head    global max-pool, linear (no bias), logits x 0.125

Why this shape: few, wide layers at low resolution keep the GPU's matrix units busy (the whole net
is ~0.6 GFLOPs per image), and max-pooling after the first conv of a stage halves the resolution
before the expensive residual convs. The 0.125 output scale keeps the initial logits small, which
Page found to matter as much as a learning-rate tweak; it is airbench's choice too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import ModelError
from .inputs import check_image_batch, model_label
from .registry import register_models

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "celu": lambda: nn.CELU(alpha=0.075)}


class ConvUnit(nn.Sequential):
    """3x3 conv (no bias: the BN after it has one) -> BatchNorm -> activation."""

    def __init__(self, cin: int, cout: int, act: str):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), ACTIVATIONS[act]()
        )


class Residual(nn.Module):
    """x + f(x) with f two conv units of the same width."""

    def __init__(self, width: int, act: str):
        super().__init__()
        self.res1, self.res2 = ConvUnit(width, width, act), ConvUnit(width, width, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res2(self.res1(x))


@dataclass
class ResNetFastConfig:
    widths: tuple[int, ...] = (64, 128, 256, 512)  # prep, layer1, layer2, layer3
    residual: tuple[bool, ...] = (True, False, True)  # which of layer1..3 carry a residual pair
    act: str = "relu"  # 'relu' | 'gelu' | 'celu' (Page's last version: CELU, alpha 0.075)
    head_scale: float = 0.125
    in_chans: int = 3
    num_classes: int = 10
    img_size: int = 32  # recorded only: the max-pool head accepts any size

    def __post_init__(self):
        self.widths, self.residual = tuple(self.widths), tuple(bool(r) for r in self.residual)
        if len(self.widths) != len(self.residual) + 1:
            raise ModelError(
                f"widths {self.widths} must give the prep width plus one per stage ({len(self.residual)} "
                "stages, from `residual`)"
            )
        if self.act not in ACTIVATIONS:
            raise ModelError(f"act must be one of {', '.join(ACTIVATIONS)}, got {self.act!r}")


class ResNetFast(nn.Module):
    def __init__(self, cfg: ResNetFastConfig):
        super().__init__()
        self.cfg = cfg
        self.prep = ConvUnit(cfg.in_chans, cfg.widths[0], cfg.act)
        for i, (cin, cout, res) in enumerate(zip(cfg.widths[:-1], cfg.widths[1:], cfg.residual)):
            parts = [ConvUnit(cin, cout, cfg.act), nn.MaxPool2d(2)] + (
                [Residual(cout, cfg.act)] if res else []
            )
            self.add_module(f"layer{i + 1}", nn.Sequential(*parts))
        self.num_features = cfg.widths[-1]
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = (
            nn.Linear(self.num_features, cfg.num_classes, bias=False)
            if cfg.num_classes > 0
            else nn.Identity()
        )

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.cfg.residual))]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        who = model_label(self)
        check_image_batch(x, self.cfg.in_chans, who)
        smallest = 2 ** len(self.stages)  # each stage halves the image with a 2x2 max-pool (floor)
        if min(x.shape[-2:]) < smallest:
            raise ModelError(
                f"{who} halves the image in each of its {len(self.stages)} stages, so it needs images of at "
                f"least {smallest}x{smallest}, got {x.shape[-2]}x{x.shape[-1]}; upsample the images"
            )
        x = self.prep(x)
        for stage in self.stages:
            x = stage(x)
        return x  # (B, C, h, w)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.pool(x), 1)
        if pre_logits or self.cfg.num_classes == 0:  # no classifier: the pooled features, unscaled (timm)
            return x
        return self.fc(x) * self.cfg.head_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def config_dict(self) -> dict:
        return asdict(self.cfg)


register_models(
    ResNetFast,
    ResNetFastConfig,
    {
        # Page's ResNet-9 (6.6M parameters): 94% on CIFAR-10 in 24 epochs in his DAWNBench runs
        "resnet9_fast": dict(),
        # half width (1.6M parameters): for CPU checks of the recipe
        "resnet9_fast_half": dict(widths=(32, 64, 128, 256)),
    },
)
