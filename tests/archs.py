"""Generated architectures for structural tests: transformers (GQA, MLP kinds, norms, fused projections,
custom `x @ w.T` linears, per-head q/k norms), CNNs (mean or adaptive pooling) and ViTs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TransformerSpec:
    vocab: int = 17
    width: int = 12
    depth: int = 2
    kv_heads: int = 2
    rep: int = 2  # query heads per kv head
    head_dim: int = 4
    ffn: int = 10
    mlp: str = "gated"  # "gated" (gate/up/down, SiLU) or "plain" (fc1/fc2, GELU)
    norm: str = "rms"  # "rms", "layer" or "none"
    residual: bool = True
    attention: str = "sdpa"  # "sdpa" or "eager" (matmul + softmax)
    bias: bool = False
    linear: str = "module"  # "module" (nn.Linear) or "matmul" (`x @ self.weight.T`, as Falcon's FalconLinear)
    fused: bool = False  # one qkv projection split by head counts, one gate_up projection split by chunk(2)
    qk_norm: bool = False  # RMSNorm over head_dim of every query and key head (Qwen3, Gemma3)


class RMSNorm(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(n))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class MatmulLinear(nn.Linear):
    """A linear layer written as `x @ self.weight.T + self.bias` (traces to aten.matmul + aten.numpy_T)."""

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


def _linear(s: "TransformerSpec", n_in: int, n_out: int) -> nn.Linear:
    return (MatmulLinear if s.linear == "matmul" else nn.Linear)(n_in, n_out, bias=s.bias)


def _norm(kind: str, n: int) -> nn.Module:
    return {"rms": lambda: RMSNorm(n), "layer": lambda: nn.LayerNorm(n), "none": nn.Identity}[kind]()


class Attention(nn.Module):
    def __init__(self, s: TransformerSpec):
        super().__init__()
        h = s.kv_heads * s.rep
        self.num_heads, self.num_key_value_heads = h, s.kv_heads  # the rewrite updates both
        if s.fused:
            self.qkv = _linear(s, s.width, (h + 2 * s.kv_heads) * s.head_dim)
        else:
            self.q = _linear(s, s.width, h * s.head_dim)
            self.k = _linear(s, s.width, s.kv_heads * s.head_dim)
            self.v = _linear(s, s.width, s.kv_heads * s.head_dim)
        self.o = _linear(s, h * s.head_dim, s.width)
        self.qn, self.kn = (RMSNorm(s.head_dim), RMSNorm(s.head_dim)) if s.qk_norm else (nn.Identity(), nn.Identity())
        self.head_dim, self.eager, self.fused = s.head_dim, s.attention == "eager", s.fused

    def forward(self, x):
        b, n, _ = x.shape
        if self.fused:
            kv = self.num_key_value_heads * self.head_dim
            q, k, v = self.qkv(x).split([self.num_heads * self.head_dim, kv, kv], dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = self.qn(q.view(b, n, -1, self.head_dim)).transpose(1, 2)
        k = self.kn(k.view(b, n, -1, self.head_dim)).transpose(1, 2)
        v = v.view(b, n, -1, self.head_dim).transpose(1, 2)
        rep = q.shape[1] // k.shape[1]
        k = k[:, :, None].expand(b, k.shape[1], rep, n, self.head_dim).reshape(b, -1, n, self.head_dim)
        v = v[:, :, None].expand(b, v.shape[1], rep, n, self.head_dim).reshape(b, -1, n, self.head_dim)
        if self.eager:
            scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5
            y = scores.softmax(-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, s: TransformerSpec):
        super().__init__()
        self.gated, self.fused = s.mlp == "gated", s.fused and s.mlp == "gated"
        if self.fused:
            self.gate_up = _linear(s, s.width, 2 * s.ffn)
        else:
            self.up = _linear(s, s.width, s.ffn)
            self.gate = _linear(s, s.width, s.ffn) if self.gated else None
        self.down = _linear(s, s.ffn, s.width)

    def forward(self, x):
        if self.fused:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.silu(self.gate(x)) * self.up(x) if self.gated else F.gelu(self.up(x))
        return self.down(h)


class Block(nn.Module):
    def __init__(self, s: TransformerSpec):
        super().__init__()
        self.n1, self.attn, self.n2, self.mlp = _norm(s.norm, s.width), Attention(s), _norm(s.norm, s.width), MLP(s)
        self.residual = s.residual

    def forward(self, x):
        y = self.attn(self.n1(x))
        x = x + y if self.residual else y
        y = self.mlp(self.n2(x))
        return x + y if self.residual else y


class TinyTransformer(nn.Module):
    def __init__(self, s: TransformerSpec):
        super().__init__()
        self.embed = nn.Embedding(s.vocab, s.width)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.depth))
        self.norm = _norm(s.norm, s.width)
        self.head = nn.Linear(s.width, s.vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


class ConvBlock(nn.Module):
    def __init__(self, c: int, mid: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, mid, 3, padding=1), nn.BatchNorm2d(mid)
        self.c2, self.b2 = nn.Conv2d(mid, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.b2(self.c2(F.relu(self.b1(self.c1(x)))))


class TinyCNN(nn.Module):
    """ResNet-style: stem conv + BN, residual blocks, a depthwise conv, global pooling (`x.mean((2, 3))`, or
    "adaptive": torchvision's `AdaptiveAvgPool2d(1)` + flatten), classifier."""

    def __init__(self, width: int = 8, mid: int = 6, depth: int = 2, classes: int = 5, pool: str = "mean"):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1) if pool == "adaptive" else None
        self.stem, self.bn = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(*[ConvBlock(width, mid) for _ in range(depth)])
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = F.relu(self.dw(self.blocks(F.relu(self.bn(self.stem(x))))))
        return self.fc(self.pool(x).flatten(1) if self.pool is not None else x.mean((2, 3)))


class TinyViT(nn.Module):
    """ViT-style encoder: conv patch embedding, class token, learned positions, pre-LN blocks, head."""

    def __init__(self, width: int = 16, heads: int = 4, depth: int = 2, patch: int = 4, image: int = 8,
                 classes: int = 5):
        super().__init__()
        spec = TransformerSpec(width=width, depth=depth, kv_heads=heads, rep=1, head_dim=width // heads,
                               ffn=2 * width, mlp="plain", norm="layer", bias=True)
        self.patch = nn.Conv2d(3, width, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, width))
        self.blocks = nn.ModuleList(Block(spec) for _ in range(depth))
        for blk in self.blocks:
            blk.attn.eager = False
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


class TinyMLP(nn.Module):
    def __init__(self, widths=(6, 9, 7, 4)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics and affine parameters (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def tiny_gemma(seed: int = 0):
    """Gemma, 2 layers, hidden 64, 4 heads of 16, 1 kv head (multi-query), vocab 128."""
    from transformers import GemmaConfig

    from surgeon_fx.hf import from_config

    return from_config(GemmaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=256), seed)
