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
    With `residual_scale` (input_dim == output_dim) the head predicts the change instead:
    z_next = z + Linear(...) * residual_scale, so the typical one-step change is of unit size.
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
        residual_scale: list[float] | None = None,
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
        self.residual = residual_scale is not None
        if residual_scale is not None:
            if input_dim != output_dim or len(residual_scale) != output_dim:
                raise ValueError("a residual model needs input_dim == output_dim == len(scale)")
            self.register_buffer("residual_scale", torch.tensor(residual_scale))

    def forward_normalised(
        self, z: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs and outputs in normalised units (what training optimises)."""
        out, (hn, cn) = self.lstm(z, (h0, c0))
        y = self.head(out)
        if self.residual:
            y = z + y * self.residual_scale
        return y, hn, cn

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


def merge_real_ensemble(members: list[RealLSTM]) -> RealLSTM:
    """One RealLSTM whose output is the mean of the members' outputs, exactly.

    K LSTMs of hidden size H side by side are one LSTM of hidden size K*H whose recurrent (and,
    above the first layer, input) weights are block-diagonal; the head averages the members'
    heads. The served graph stays one LSTM op per layer, as the contract asks.
    """
    import copy

    first = members[0]
    k, lstm = len(members), first.lstm
    h, layers = lstm.hidden_size, lstm.num_layers
    merged = copy.deepcopy(first)
    merged.lstm = nn.LSTM(
        lstm.input_size, h * k, num_layers=layers, batch_first=True, dropout=lstm.dropout
    )
    merged.head = nn.Linear(h * k, first.head.out_features)

    def rows(g: int, m: int, size: int) -> slice:
        return slice(g * size * k + m * size, g * size * k + (m + 1) * size)

    with torch.no_grad():
        for layer in range(layers):
            w_ih = getattr(merged.lstm, f"weight_ih_l{layer}")
            w_hh = getattr(merged.lstm, f"weight_hh_l{layer}")
            for t in (
                w_ih,
                w_hh,
                *(getattr(merged.lstm, f"bias_{n}_l{layer}") for n in ["ih", "hh"]),
            ):
                t.zero_()
            for m, member in enumerate(members):
                src = member.lstm
                cols = slice(m * h, (m + 1) * h)
                for g in range(4):  # gates i, f, g, o: each a block of rows
                    r, sr = rows(g, m, h), slice(g * h, (g + 1) * h)
                    mi = getattr(src, f"weight_ih_l{layer}")[sr]
                    if layer == 0:
                        w_ih[r] = mi
                    else:
                        w_ih[r, cols] = mi
                    w_hh[r, cols] = getattr(src, f"weight_hh_l{layer}")[sr]
                    for n in ("ih", "hh"):
                        getattr(merged.lstm, f"bias_{n}_l{layer}")[r] = getattr(
                            src, f"bias_{n}_l{layer}"
                        )[sr]
        merged.head.weight.copy_(torch.cat([m.head.weight for m in members], dim=1) / k)
        merged.head.bias.copy_(torch.stack([m.head.bias for m in members]).mean(dim=0))
    return merged
