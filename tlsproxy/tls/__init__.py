"""TLS: the policy every context is built from, and the SNI map that picks one."""
