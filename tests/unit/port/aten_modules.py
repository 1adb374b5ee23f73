"""The torch modules tests/test_aten_port.py lowers (kept apart: the test file stays short).

Funcs and Breadth spell the operators issue 18 listed and more of the core ATen set; Spatial,
Attn and ResNet18 (torchvision's layout, written here: torchvision does not import) are the
layers: convolutions, norms, pooling, resampling, attention, embeddings.
"""

from __future__ import annotations

import torch
import torch.nn as tnn
import torch.nn.functional as F

__all__ = ["Attn", "BasicBlock", "Breadth", "Funcs", "LongAttn", "ResNet18", "Spatial"]


class Funcs(tnn.Module):
    """The function and method spellings issue 18 found missing."""

    def __init__(self):
        super().__init__()
        self.fc = tnn.Linear(6, 6)

    def forward(self, x):  # (N, 6)
        h = self.fc(x)
        m = torch.max(h, dim=1, keepdim=True).values
        a = torch.sum(h, 1, keepdim=True) + torch.mean(h) + torch.max(h)
        h = torch.clamp(h, -1.0, 1.0) + torch.maximum(h, m) + a
        v, idx = h.max(dim=-1)
        h = h + h.amax(dim=1, keepdim=True) + h.clamp(min=0.1) + h.norm(dim=1, keepdim=True)
        h = h + h.var(dim=1, keepdim=True)
        e = h[:, :1].expand(-1, 6)
        p, q = h.split(3, dim=1)
        r, t = h.chunk(2, dim=1)
        h = e + torch.cat([p * t, q + r], 1)
        h = h.clone().relu_().float().to(torch.float32)
        st = torch.stack([h, -h], dim=1)  # (N, 2, 6)
        es = torch.einsum("nij,nkj->nik", st, st)  # (N, 2, 2)
        bm = torch.bmm(es, st)
        h = torch.where(h > 0.2, h, bm[:, 0] * 0.01) + torch.logsumexp(st, dim=1) + torch.rsqrt(h.abs() + 1)
        h = h + torch.arange(6, dtype=h.dtype) + torch.zeros_like(h) + h.new_ones(h.shape) + v[:, None]
        return F.normalize(h, dim=1) + idx[:, None].float() * 0.01


class Breadth(tnn.Module):
    """More of the core ATen set: elementwise math, integer ops, reductions, gathers, in-place
    slice writes (select/slice_scatter), diagonals, reflect/replicate padding, 1-D pooling."""

    def __init__(self):
        super().__init__()
        self.fc = tnn.Linear(6, 6)
        self.convT1 = tnn.ConvTranspose1d(2, 3, 3, stride=2)
        self.register_buffer("idx", torch.tensor([2, 0, 1]))

    def forward(self, x):  # (N, 6)
        h = self.fc(x)
        a = torch.sin(h) + torch.cos(h) + torch.exp2(h * 0.1) + torch.log1p(h.abs()) + torch.expm1(h * 0.1)
        a = a + torch.atan(h) + torch.floor(h) * 0.1 + torch.round(h) * 0.1 + torch.sign(h) + F.hardtanh(h)
        a = a + F.softplus(h, beta=2) + F.silu(h) + F.mish(h) + F.hardswish(h) + F.selu(h) + F.logsigmoid(h)
        a = a + torch.remainder(h, 0.7) + torch.fmod(h, 0.7) + torch.div(h, 0.3, rounding_mode="floor")
        a = a + torch.minimum(h, h.flip(1)) + h.roll(2, 1) + h.cumsum(1) + torch.atan2(h, h + 2)
        m, i = h.min(dim=1, keepdim=True)
        a = a + m + i.float() + h.argmax(1, keepdim=True).float() + h.prod(1, keepdim=True) * 0.01
        a = (
            a
            + (h > 0).any(1, keepdim=True).float()
            + (h > -3).all(1, keepdim=True).float()
            + (h.long() & 3).float()
        )
        a = a + torch.gather(h, 1, self.idx.repeat(h.shape[0], 2)) + h[:, self.idx].repeat(1, 2)
        a = a + torch.stack(h.unbind(1), 1) + h.std(1, keepdim=True) + h.norm(p=1, dim=1, keepdim=True)
        y = a.clone()
        y[:, 0] = h[:, 1] * 2
        y[:, 2:5] = h[:, :3].exp()
        d = torch.diagonal(h.reshape(-1, 2, 3), offset=1, dim1=1, dim2=2).sum(1, keepdim=True)
        r = (
            F.pad(h[:, None], (2, 1), mode="reflect")[:, 0, :6]
            + F.pad(h[:, None], (1, 1), mode="replicate")[:, 0, 1:7]
        )
        c = self.convT1(h.reshape(-1, 2, 3))  # (N, 3, 7)
        p = F.avg_pool1d(c, 2).sum((1, 2)) + F.adaptive_avg_pool1d(c, 3).mean((1, 2))
        return y + d + r + p[:, None] + torch.masked_fill(h, h > 1, 0.5)


class Spatial(tnn.Module):
    """Conv1d, ConvTranspose2d (strided, grouped), GroupNorm, F.pad, F.interpolate, adaptive pooling."""

    def __init__(self):
        super().__init__()
        self.conv1d = tnn.Conv1d(3, 4, 3, padding=2, dilation=2, stride=2)
        self.convT = tnn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.gn = tnn.GroupNorm(2, 4)
        self.pool = tnn.AdaptiveAvgPool2d((2, 3))
        self.conv = tnn.Conv2d(6, 3, 3, padding=1)

    def forward(self, x):  # (N, 3, 4, 8)
        n = x.shape[0]
        h = self.conv1d(x.reshape(n, 3, 32)).reshape(n, 4, 4, 4)
        h = F.pad(self.gn(h), (1, 1, 0, 2))  # (N, 4, 6, 6)
        h = F.interpolate(h, scale_factor=2, mode="nearest")  # 12 x 12
        h = self.pool(h)  # (N, 4, 2, 3), uneven bins
        h = self.conv(self.convT(h))  # (N, 3, 4, 6)
        up = F.interpolate(x, size=(4, 6), mode="bilinear", align_corners=False)
        return h + up + F.interpolate(x, size=(4, 6), mode="bilinear", align_corners=True)


class Attn(tnn.Module):
    """Embedding, MultiheadAttention, F.scaled_dot_product_attention (causal), RMSNorm."""

    def __init__(self):
        super().__init__()
        self.mha = tnn.MultiheadAttention(8, 2, batch_first=True)
        self.emb = tnn.Embedding(10, 8)
        self.rms = tnn.RMSNorm(8)

    def forward(self, x):  # (N, L, 8)
        idx = (x[..., 0].abs() * 3).long().clamp(max=9)
        h = x + self.emb(idx)
        a, _ = self.mha(h, h, h)
        q = h.reshape(h.shape[0], h.shape[1], 2, 4).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(h.shape)
        return self.rms(a + o)


class LongAttn(tnn.Module):
    """F.scaled_dot_product_attention over more keys than one block of the blockwise lowering:
    causal with grouped-query heads (4 query heads, 2 key/value heads), and a padding mask."""

    def __init__(self):
        super().__init__()
        self.q = tnn.Linear(8, 8)
        self.kv = tnn.Linear(8, 8)

    def forward(self, x):  # (N, L, 8), L > 512
        n, length, _ = x.shape
        q = self.q(x).reshape(n, length, 4, 2).transpose(1, 2)
        k, v = self.kv(x).reshape(n, length, 2, 2, 2).permute(2, 0, 3, 1, 4)  # (N, 2, L, 2) each
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        keep = (x[..., :1] > -1.0).transpose(1, 2)[:, None]  # (N, 1, 1, L): padding
        b = F.scaled_dot_product_attention(q, q, q, attn_mask=keep)
        return (a + b).transpose(1, 2).reshape(n, length, 8)


class BasicBlock(tnn.Module):
    """torchvision's ResNet basic block (torchvision does not import here)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.relu = tnn.ReLU(inplace=True)
        self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(tnn.Module):
    """torchvision's ResNet-18 layout ([2, 2, 2, 2] basic blocks), narrow (width 8)."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.inplanes = width
        self.conv1 = tnn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = tnn.BatchNorm2d(width)
        self.relu = tnn.ReLU(inplace=True)
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, 2)
        self.layer2 = self._make_layer(width * 2, 2, 2)
        self.layer3 = self._make_layer(width * 4, 2, 2)
        self.layer4 = self._make_layer(width * 8, 2, 2)
        self.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
        self.fc = tnn.Linear(width * 8, num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = tnn.Sequential(
                tnn.Conv2d(self.inplanes, planes, 1, stride, bias=False), tnn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return tnn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
