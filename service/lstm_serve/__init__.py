"""lstm-serve: stateful gRPC streaming inference for LSTM sequence models (docs/architecture.md)."""

from importlib.metadata import PackageNotFoundError, version

from lstm_serve.client import AsyncClient, Client

try:
    __version__ = version("lstm-serve")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["AsyncClient", "Client", "__version__"]
