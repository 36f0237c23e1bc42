"""Vision transformers for 32x32 inputs, laid out for the ZooNet contract and INT8 export.

Layout (Compact Convolutional Transformer tokenizer, Hassani et al., 2021, with a class
token): ``features[0]`` is the :class:`ConvTokenizer` (conv-bn-relu + 2x2 max-pool per
stage, then flatten to tokens, prepend the class token, add a learned position
embedding), ``features[1..depth]`` are pre-norm transformer :class:`Block` s, and
``classifier`` is LayerNorm -> class token -> linear. Every block maps ``[B, 1 + N, D]``
tokens to the same shape, so an early exit after any block reads the class token
(:meth:`ViT.exit_head`).

INT8 rules: every linear runs on a 2-D ``[B * tokens, features]`` input
(:class:`TokenLinear`), which ONNX exports as Gemm and onnxruntime fuses with its
QuantizeLinear/DequantizeLinear into QGemm (a linear on 3-D tokens exports as MatMul
then a bias Add, which is not the DequantizeLinear -> Gemm -> QuantizeLinear group that
the fusion looks for). The attention matmuls read quantized inputs (see
:func:`pqd.quant.annotate.transformer_float_paths`). Attention is
written out (one qkv linear, two matmuls, softmax, output projection): no
``scaled_dot_product_attention``, whose fused op neither PT2E nor the ONNX runtimes
quantize. Heads are the leading split of q/k/v features (``num_heads`` x ``head_dim``),
so head pruning removes whole ``head_dim`` slices (Torch-Pruning's ``num_heads``).

Counts at 32x32 for 10 classes: ``vit_small`` (dim 192, depth 6, 6 heads, mlp 384,
tokenizer widths 64/192 -> 64 tokens) 1.91 M params, 145 MMACs (conv + linear; the
attention matmuls add 9.7 MMACs); ``vit_tiny`` (dim 32, depth 2, 2 heads, tokenizer
8/16/32 -> 16 tokens) 24 k params, 1.1 MMACs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pqd.models._common import ConvBN, ZooNet
from pqd.registry import register_model


class TokenLinear(nn.Linear):
    """``nn.Linear`` applied to ``[..., in]`` through a 2-D ``[rows, in]`` view, so the
    export is one Gemm (QGemm once quantized) whatever the number of leading dims."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        out = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return out.reshape(*lead, out.shape[-1])


class Attention(nn.Module):
    """Multi-head self-attention: qkv linear, ``softmax(q k^T / sqrt(d)) v``, projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.head_dim = dim // num_heads
        self.qkv = TokenLinear(dim, 3 * dim)
        self.proj = TokenLinear(dim, dim)

    @property
    def num_heads(self) -> int:
        """Heads left: read from the qkv weight, which head pruning narrows by whole heads."""
        return self.qkv.out_features // (3 * self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        inner = self.num_heads * self.head_dim
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, d]
        # scaled after the product: q and k reach the matmul as the qkv linear quantized
        # them, so onnxruntime runs it on integers (a scale before it would be requantized)
        attn = torch.matmul(q, k.transpose(-2, -1)) * self.head_dim**-0.5
        attn = attn.softmax(dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, inner)
        return self.proj(out)


class Mlp(nn.Module):
    """linear -> GELU -> linear (``hidden`` units: what MLP pruning narrows)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = TokenLinear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = TokenLinear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ConvTokenizer(nn.Module):
    """conv-bn-relu + max-pool 2 per width, flatten to ``[B, N, D]`` tokens, class token
    first, learned position embedding added (``tokens`` = N + 1 for the input size)."""

    def __init__(self, widths: Sequence[int], image_size: int = 32, in_ch: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for w in widths:
            layers += [ConvBN(in_ch, w), nn.MaxPool2d(2)]
            in_ch = w
        self.convs = nn.Sequential(*layers)
        side = image_size // 2 ** len(widths)
        if side < 1:
            raise ValueError(f"{len(widths)} tokenizer stages leave no tokens at {image_size}px")
        self.tokens = side * side + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, in_ch))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.tokens, in_ch))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x).flatten(2).transpose(1, 2)  # [B, N, D]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed


class ClassTokenHead(nn.Module):
    """LayerNorm -> class token (token 0) -> linear: the final head and every exit head."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x[:, 0]))


class ViT(ZooNet):
    """Conv tokenizer, ``depth`` transformer blocks, class-token head (see module doc).

    ``default_exit_points``: after blocks about 1/3 and 2/3 of the way (``features[k]`` is
    block ``k``). ``exit_head`` builds the class-token head that early exits use.
    """

    def __init__(
        self,
        num_classes: int = 10,
        dim: int = 192,
        depth: int = 6,
        num_heads: int = 6,
        mlp_hidden: int = 384,
        tokenizer: Sequence[int] = (64,),
        image_size: int = 32,
    ) -> None:
        widths = [int(w) for w in tokenizer] + [int(dim)]
        if min(widths) < 1 or depth < 1 or num_heads < 1 or mlp_hidden < 1:
            raise ValueError(
                f"dim {dim}, depth {depth}, num_heads {num_heads}, mlp_hidden {mlp_hidden} "
                f"and tokenizer {list(tokenizer)} must be positive"
            )
        layers: list[nn.Module] = [ConvTokenizer(widths, image_size)]
        layers += [Block(dim, num_heads, mlp_hidden) for _ in range(depth)]
        exits = sorted({min(max(round(depth * k / 3), 1), depth - 1) for k in (1, 2)})
        super().__init__(
            nn.Sequential(*layers), ClassTokenHead(dim, num_classes), exits if depth > 1 else []
        )
        self.apply(_init_vit)

    @staticmethod
    def exit_head(shape: Sequence[int], num_classes: int) -> nn.Module:
        """The early-exit head for block outputs shaped ``[B, tokens, dim]``."""
        return ClassTokenHead(int(shape[-1]), num_classes)


def _init_vit(m: nn.Module) -> None:
    """timm's ViT init: truncated-normal linears (std 0.02, zero bias), unit LayerNorm,
    Kaiming convs."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


@register_model
def vit_small(num_classes: int = 10, **kwargs) -> nn.Module:
    """Conv-tokenizer ViT: 1.91 M params, 145 MMACs at 32x32 (see module doc). ``kwargs``
    are :class:`ViT`'s (dim 192, depth 6, 6 heads, mlp 384, tokenizer (64,) by default)."""
    return ViT(num_classes, **kwargs)


@register_model
def vit_tiny(num_classes: int = 10, **kwargs) -> nn.Module:
    """Test-sized ViT: dim 32, 2 blocks of 2 heads, mlp 64, tokenizer 8 -> 16 tokens."""
    opts = {"dim": 32, "depth": 2, "num_heads": 2, "mlp_hidden": 64, "tokenizer": (8, 16)}
    opts.update(kwargs)
    return ViT(num_classes, **opts)
