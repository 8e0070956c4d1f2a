"""Small models shared by the tests (fixed shapes, fast on CPU)."""
import torch
from torch import nn


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 2, kdim=6, vdim=6, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        q = self.inp(x)
        out, _ = self.attn(q, x, x, need_weights=False)
        return self.head(out.mean(1))


def mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))


def cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(12 * 3 * 3, 5))


def transformer():
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False),
                         nn.Flatten(), nn.Linear(16 * 5, 3))


# (name, builder, input shape, number of outputs)
MODELS = [
    ("mlp", mlp, (8, 16), 4),
    ("cnn", cnn, (4, 3, 8, 8), 5),
    ("transformer", transformer, (4, 5, 16), 3),
    ("cross_attention", CrossAttention, (4, 5, 6), 3),
]


def batches(shape, n_out, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), torch.randint(0, n_out, (shape[0],), generator=g))
            for _ in range(steps)]
