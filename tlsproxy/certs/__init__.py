"""Certificates: the value type, and the directory store that keeps them."""
