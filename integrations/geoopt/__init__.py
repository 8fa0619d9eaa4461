"""geoopt bridge (in progress)."""
