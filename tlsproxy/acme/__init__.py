"""ACME (RFC 8555): challenge answers, the CA client, issuance and renewal timing."""
