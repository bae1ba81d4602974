"""A tiny real Django project that the proxy integration tests talk to (no database)."""
