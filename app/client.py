"""Kept for existing code: the HTTP client lives in the library (`nba_core.client`, installed without the service)."""

from nba_core.client import APIError, MultipartStream, NBAClient, sanitize

__all__ = ["APIError", "MultipartStream", "NBAClient", "sanitize"]
