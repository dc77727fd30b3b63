"""Importable test helpers (``from tests.helpers.models import make_model_repo``)."""
