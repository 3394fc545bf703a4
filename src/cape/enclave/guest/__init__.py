"""Modules offered to functions *inside* the sandbox (stdlib only; never imported by the runtime).

:mod:`cape.enclave.sandbox` binds these files read-only into every sandbox under
``/cape-worker/guest``; see ``cape_encrypt.py``. Nothing here may import cape: the sandbox has
none (tests/unit/test_layering.py and the sandbox tests check it).
"""
