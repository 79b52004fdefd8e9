"""A small vision transformer with the structure of CLIP's ViT image encoder.

Patch embedding (a strided conv), a class token and learned positional embedding, pre-LayerNorm
blocks of multi-head self-attention (fused qkv projection, output projection) and an MLP
(fc1, GELU, fc2), then a final LayerNorm; the class token's output is the feature vector.
Parameter names follow timm (`blocks.{i}.attn.qkv.weight`, ...), which merging code and
teammates key on. The module holds no state beyond its parameters (no buffers), so
`torch.func.functional_call` with any state dict of the same names gives the same model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

MODEL_TYPE = "mergeflow-vit"


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 28
    patch_size: int = 7
    in_channels: int = 1
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 128

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        """The checkpoint's config.json (with `model_type`)."""
        return {"model_type": MODEL_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        model_type = d.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"config.json has model_type {model_type!r}, expected {MODEL_TYPE!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"model_type"})
        if unknown:
            raise ValueError(f"unknown ViTConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """forward(images (B, C, H, W)) -> features (B, dim), the final class-token embedding."""

    def __init__(self, config: ViTConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ViTConfig()
        self.patch_embed = nn.Conv2d(config.in_channels, config.dim, config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.dim))
        self.blocks = nn.ModuleList(
            Block(config.dim, config.heads, config.mlp_dim) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ViT-style init: truncated normal (std 0.02) for embeddings and Linear weights.

        Uses the global torch RNG; seed it (or fork it) for a reproducible init.
        """
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, patches, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])


def build_encoder(config: ViTConfig | dict | None = None, state_dict: dict | None = None) -> VisionTransformer:
    """A VisionTransformer from a config (object or config.json dict), optionally with weights.

    Given weights, the throwaway random init runs on a forked RNG, so loading a model never
    shifts the caller's random stream.
    """
    if isinstance(config, dict):
        config = ViTConfig.from_dict(config)
    if state_dict is None:
        return VisionTransformer(config)
    with torch.random.fork_rng(devices=[]):
        model = VisionTransformer(config)
    model.load_state_dict(state_dict, strict=True)
    return model
