"""Service core shared by the API and the worker. Importable without FastAPI and without torch."""
