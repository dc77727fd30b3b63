"""The PyTorch models lstm-serve trains and exports (torch is a training-only dependency).

Both wrap one nn.LSTM (batch_first) and follow the graph contract in docs/architecture.md:
forward(x, h0, c0) -> (y, hn, cn), with h0/c0 shaped [layers, batch, hidden].
"""

from __future__ import annotations

import torch
from torch import nn


class RealLSTM(nn.Module):
    """Multivariate next-step regressor. Normalisation lives inside the module (and the graph).

    x [B, T, input_dim] raw units -> (x - in_mean) / in_std -> LSTM -> Linear -> * out_std + out_mean.
    """

    in_mean: torch.Tensor
    in_std: torch.Tensor
    out_mean: torch.Tensor
    out_std: torch.Tensor

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        hidden_size: int,
        layers: int,
        dropout: float = 0.0,
        in_mean: list[float] | None = None,
        in_std: list[float] | None = None,
        out_mean: list[float] | None = None,
        out_std: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.lstm = nn.LSTM(
            input_dim,
            hidden_size,
            num_layers=layers,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.head = nn.Linear(hidden_size, output_dim)
        self.register_buffer("in_mean", torch.tensor(in_mean or [0.0] * input_dim))
        self.register_buffer("in_std", torch.tensor(in_std or [1.0] * input_dim))
        self.register_buffer("out_mean", torch.tensor(out_mean or [0.0] * output_dim))
        self.register_buffer("out_std", torch.tensor(out_std or [1.0] * output_dim))

    def forward_normalised(
        self, z: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs and outputs in normalised units (what training optimises)."""
        out, (hn, cn) = self.lstm(z, (h0, c0))
        return self.head(out), hn, cn

    def forward(
        self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = (x - self.in_mean) / self.in_std
        y, hn, cn = self.forward_normalised(z, h0, c0)
        return y * self.out_std + self.out_mean, hn, cn


class TokenLSTM(nn.Module):
    """Next-token model: ids [B, T] -> Embedding -> LSTM -> Linear -> logits (softmax at export)."""

    def __init__(
        self, vocab_size: int, embed_dim: int, hidden_size: int, layers: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(
            embed_dim,
            hidden_size,
            num_layers=layers,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(
        self, ids: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, (hn, cn) = self.lstm(self.embed(ids), (h0, c0))
        return self.head(out), hn, cn


class WithSoftmax(nn.Module):
    """Export wrapper: token models serve probabilities, not logits."""

    def __init__(self, inner: TokenLSTM) -> None:
        super().__init__()
        self.inner = inner

    def forward(
        self, ids: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, hn, cn = self.inner(ids, h0, c0)
        return torch.softmax(logits, dim=-1), hn, cn
