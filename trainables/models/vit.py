"""Vision transformer on a CLS token, the ViT of seed 000 §4.2 and Fig. 4.

Pre-norm blocks: ``x + attn(norm(x))`` then ``x + fc2(gelu(fc1(norm(x))))``. Taps, on the CLS token: for
each block ``block{i}.fc`` (the FC output before the residual) and ``block{i}.out`` (the block output
after it), then ``cls`` (the final normed CLS features the head reads). ETF candidates from the top: the
head, then each block's fc2 and fc1, last block first (the ETF-Transformer of 000 §4.2).
"""

from __future__ import annotations

import torch
from torch import nn

from trainables.config import ViTConfig


class Block(nn.Module):
    def __init__(self, width: int, heads: int, fc_width: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, fc_width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(fc_width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        fc = self.fc2(self.act(self.fc1(self.norm2(x))))
        return x + fc, fc


class ViT(nn.Module):
    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int, cfg: ViTConfig) -> None:
        super().__init__()
        channels, height, width = input_shape
        patches = (height // cfg.patch_size) * (width // cfg.patch_size)
        self.patchify = nn.Conv2d(channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, patches + 1, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.fc_width) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, num_classes)
        self.tap_names = [f"block{i}.{kind}" for i in range(1, cfg.depth + 1) for kind in ("fc", "out")] + [
            "cls"
        ]
        self.penultimate = "cls"

    @property
    def classifier(self) -> nn.Linear:
        return self.head

    def forward_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.patchify(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos
        taps = {}
        for i, block in enumerate(self.blocks, start=1):
            x, fc = block(x)
            taps[f"block{i}.fc"] = fc[:, 0]
            taps[f"block{i}.out"] = x[:, 0]
        cls = self.norm(x[:, 0])
        taps["cls"] = cls
        return self.head(cls), taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_taps(x)[0]

    def etf_candidates(self) -> list[tuple[str, nn.Linear]]:
        out = [("head", self.head)]
        for i in range(len(self.blocks), 0, -1):
            block = self.blocks[i - 1]
            out += [(f"block{i}.fc2", block.fc2), (f"block{i}.fc1", block.fc1)]
        return out

    def etf_input_taps(self) -> list[str | None] | None:
        return None  # fc1/fc2 read token-wise hidden states that are not taps: no Adaptive-ETF

    def consumer_weights(self) -> dict[str, torch.Tensor]:
        return {"cls": self.head.weight}

    def transformer_etf_depth(self, variant: str) -> int:
        """How many of :meth:`etf_candidates` an ETF-Transformer variant fixes (000 §4.2)."""
        blocks = {"head": 0, "last_block": 1, "last_2_blocks": 2, "all": len(self.blocks)}[variant]
        return 1 + 2 * blocks
