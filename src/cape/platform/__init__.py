"""Composition roots: wire the trust domains (host, key service, enclaves) into one platform.

This is the only package allowed to import every domain; the domains themselves stay apart.
"""
