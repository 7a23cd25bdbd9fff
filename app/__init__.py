"""The NBA sanitization service: REST API (app.api, app.main), shared core (app.core), client (app.client)."""
