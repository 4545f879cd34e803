"""HTML pages and htmx fragments (not part of the OpenAPI schema)."""
