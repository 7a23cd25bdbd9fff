"""REST API (FastAPI) for the sanitization service, versioned under /v1. Never imports torch."""
