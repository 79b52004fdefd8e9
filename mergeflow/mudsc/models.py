"""The architectures of the different-initialisation family: backbones plus a per-task head.

Every backbone maps images (B, 1, 28, 28) to features (B, feature_dim); a `Classifier` adds its
own linear head over its task's classes. Widths are small so that the whole family trains on a
shared 2-core CPU in well under a minute.
"""

from __future__ import annotations

import torch
from torch import nn

from mergeflow.zoo.vit import VisionTransformer, ViTConfig


class MLP(nn.Module):
    """Flatten, then `depth` Linear+ReLU layers of `width` units."""

    def __init__(self, width: int = 128, depth: int = 3, in_features: int = 784) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
        self.layers = nn.Sequential(*layers)
        self.feature_dim = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class BasicBlock(nn.Module):
    """ResNet basic block: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetBN(nn.Module):
    """Stride-2 stem conv+BN, two stages of basic blocks (the second halves the resolution), avg-pool."""

    def __init__(self, width: int = 16, blocks_per_stage: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stage1 = [BasicBlock(width, width) for _ in range(blocks_per_stage)]
        stage2 = [BasicBlock(width, 2 * width, 2)] + [
            BasicBlock(2 * width, 2 * width) for _ in range(blocks_per_stage - 1)
        ]
        self.layer1 = nn.Sequential(*stage1)
        self.layer2 = nn.Sequential(*stage2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 2 * width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(images)))
        return torch.flatten(self.pool(x), 1)


class CNNGroupNorm(nn.Module):
    """Three conv+GroupNorm+ReLU layers (all stride 2), avg-pool; no residuals."""

    def __init__(self, width: int = 16, groups: int = 4) -> None:
        super().__init__()
        chans = [1, width, 2 * width, 2 * width]
        layers: list[nn.Module] = []
        for i, stride in enumerate((2, 2, 2)):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride, 1), nn.GroupNorm(groups, chans[i + 1]), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.feature_dim = 2 * width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(self.features(images)))


def small_vit(width: int = 32, depth: int = 2, heads: int = 4) -> VisionTransformer:
    """Helper A's ViT (timm names) at a small width; `feature_dim` is the embedding width."""
    vit = VisionTransformer(ViTConfig(dim=width, depth=depth, heads=heads, mlp_dim=2 * width))
    vit.feature_dim = width
    return vit


BACKBONES = {
    "mlp": lambda width: MLP(width=width),
    "resnet_bn": lambda width: ResNetBN(width=width),
    "cnn_gn": lambda width: CNNGroupNorm(width=width),
    "vit": lambda width: small_vit(width=width),
}
DEFAULT_WIDTH = {"mlp": 128, "resnet_bn": 16, "cnn_gn": 16, "vit": 32}


def build_backbone(family: str, width: int | None = None) -> nn.Module:
    if family not in BACKBONES:
        raise ValueError(f"unknown model family {family!r}; available: {sorted(BACKBONES)}")
    return BACKBONES[family](width or DEFAULT_WIDTH[family])


class Classifier(nn.Module):
    """A backbone and its own linear head over `classes` (the labels of its task)."""

    def __init__(self, backbone: nn.Module, classes: list[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, len(classes))
        self.classes = list(classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


class MultiHeadModel(nn.Module):
    """One (merged) backbone feeding several heads; logits concatenated over all their classes."""

    def __init__(self, backbone: nn.Module, heads: list[nn.Linear], classes: list[list[int]]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)
        self.heads_classes = [list(cs) for cs in classes]
        self.classes = [c for cs in classes for c in cs]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(images)
        return torch.cat([h(feats) for h in self.heads], dim=1)
