"""The position-wise feed-forward network of every Transformer block."""

from __future__ import annotations

from torch import nn


class Mlp(nn.Module):
    """Linear -> activation -> dropout -> Linear -> dropout (timm's names: fc1, fc2)."""

    def __init__(self, dim: int, hidden_dim: int, *, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
