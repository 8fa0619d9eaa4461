"""A compact vision transformer, built from a config, for adapter experiments on small images.

Plain ``torch.nn`` layers only, so that adapters (and ``tuckerize``) see every projection as an
``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding`` with a stable name:

- ``patch_embed``: ``nn.Conv2d(channels, dim, patch_size, stride=patch_size)``;
- ``pos_embed``: ``nn.Embedding(num_patches + 1, dim)``, looked up with ``arange`` (as BERT's
  position embeddings), so an embedding adapter can be tried on it; ``cls_token``: a parameter;
- ``blocks.<i>.attn.qkv``: the *fused* query/key/value projection ``nn.Linear(dim, 3·dim)``,
  ``blocks.<i>.attn.proj``: the output projection; ``blocks.<i>.mlp.fc1`` / ``fc2``;
  pre-norm ``blocks.<i>.norm1`` / ``norm2`` (``nn.LayerNorm``);
- ``norm`` and ``head``: final ``nn.LayerNorm`` and the classifier on the class token.

Attention is :func:`torch.nn.functional.scaled_dot_product_attention`; nothing is downloaded and
the model is meant to be trained from scratch (it pretrains on 4,000 MNIST digits in seconds).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ViTConfig", "VisionTransformer"]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Sizes of a :class:`VisionTransformer`.

    Parameters
    ----------
    image_size : int
        Height and width of the (square) input images; a multiple of ``patch_size``.
    patch_size : int
    channels : int
        Input image channels.
    dim : int
        Token width; a multiple of ``heads``.
    depth : int
        Number of transformer blocks.
    heads : int
        Attention heads per block.
    mlp_dim : int
        Hidden width of each block's MLP.
    num_classes : int
    dropout : float
        Dropout on the attention output and the MLP (0 by default).

    Examples
    --------
    >>> from tuckerman.integrations.torch import ViTConfig
    >>> cfg = ViTConfig(num_classes=5)
    >>> cfg.num_patches, cfg.dim // cfg.heads
    (16, 16)
    """

    image_size: int = 28
    patch_size: int = 7
    channels: int = 1
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 128
    num_classes: int = 10
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for field in ("image_size", "patch_size", "channels", "dim", "depth", "heads", "mlp_dim"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"ViTConfig: {field} must be a positive integer, got {value!r}")
        n = self.num_classes
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
            raise ValueError(f"ViTConfig: num_classes must be an integer >= 2, got {n!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViTConfig: image_size={self.image_size} is not a multiple of "
                f"patch_size={self.patch_size}"
            )
        if self.dim % self.heads:
            raise ValueError(f"ViTConfig: dim={self.dim} is not a multiple of heads={self.heads}")
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
            raise ValueError(f"ViTConfig: dropout must be in [0, 1), got {p!r}")

    @property
    def num_patches(self) -> int:
        """Patches per image, ``(image_size / patch_size)²``."""
        return (self.image_size // self.patch_size) ** 2


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.dropout(self.proj(y.transpose(1, 2).reshape(b, n, d)))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class _Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = _Attention(cfg.dim, cfg.heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = _MLP(cfg.dim, cfg.mlp_dim, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """A pre-norm vision transformer (ViT, Dosovitskiy et al. 2021) of :class:`ViTConfig` sizes.

    Parameters
    ----------
    config : ViTConfig, optional
        Default ``ViTConfig()``: 28×28 grey images, 7×7 patches, 4 blocks of width 64.
    device, dtype : optional
        Where and in which floating dtype the parameters are created.

    Examples
    --------
    >>> import torch
    >>> from tuckerman.integrations.torch import VisionTransformer, ViTConfig
    >>> vit = VisionTransformer(ViTConfig(num_classes=5, depth=2))
    >>> vit(torch.zeros(3, 1, 28, 28)).shape
    torch.Size([3, 5])
    >>> [n for n, m in vit.named_modules() if n.startswith("blocks.0.") and "." not in n[9:]]
    ['blocks.0.norm1', 'blocks.0.attn', 'blocks.0.norm2', 'blocks.0.mlp']
    """

    def __init__(
        self, config: ViTConfig | None = None, *, device: Any = None, dtype: Any = None
    ) -> None:
        cfg = ViTConfig() if config is None else config
        if not isinstance(cfg, ViTConfig):
            raise TypeError(f"VisionTransformer expects a ViTConfig, got {type(cfg).__name__}")
        super().__init__()
        self.config = cfg
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Embedding(cfg.num_patches + 1, cfg.dim)
        self.blocks = nn.ModuleList([_Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        with torch.no_grad():
            nn.init.normal_(self.cls_token, std=0.02)
            nn.init.normal_(self.pos_embed.weight, std=0.02)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"VisionTransformer expects images of shape (batch, {cfg.channels}, "
                f"{cfg.image_size}, {cfg.image_size}), got {tuple(x.shape)}"
            )
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (b, patches, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        positions = torch.arange(tokens.shape[1], device=x.device)
        tokens = tokens + self.pos_embed(positions)
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens[:, 0]))
