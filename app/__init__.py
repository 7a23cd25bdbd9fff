"""The NBA sanitization service: REST API (app.api, app.main), shared core (app.core), client re-export (app.client; the client is nba_core.client)."""
