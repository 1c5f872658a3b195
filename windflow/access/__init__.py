"""Tenants' API keys and the session tokens they mint (docs/access.md).

``tokens``: minting and verifying tokens, pure logic. ``keys``: API keys and signing keys
in etcd, and ``AccessView``, which keeps a ``TokenVerifier`` current from there.
"""
