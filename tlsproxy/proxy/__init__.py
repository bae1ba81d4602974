"""The reverse proxy: header policy, the upstream pool, and the per-request relay."""
