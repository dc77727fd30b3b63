"""lstm-serve: stateful gRPC streaming inference for LSTM sequence models (docs/architecture.md)."""

from lstm_serve.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client"]
