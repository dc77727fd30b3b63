"""lstm-serve: stateful gRPC streaming inference for LSTM sequence models (docs/architecture.md).

The Python SDK is lstm_serve.client (docs/client.md); its main names are re-exported here.
"""

from importlib.metadata import PackageNotFoundError, version

from lstm_serve.client import AsyncClient, Client, Connection, LstmServeError

try:
    __version__ = version("lstm-serve")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["AsyncClient", "Client", "Connection", "LstmServeError", "__version__"]
