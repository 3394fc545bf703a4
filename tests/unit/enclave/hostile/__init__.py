"""Small hostile (and a few honest) ``app.py`` functions for test_sandbox.py.

Each file is copied into a fresh function directory as ``app.py``; none is imported by the
tests themselves. Parameters arrive as the call's input (JSON where there are several).
"""
