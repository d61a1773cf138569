"""TUF metadata for fleets whose Linux devices already run a TUF client (python-tuf ngclient).

``signer.py`` lets otaguard's :class:`~otaguard.crypto.cose.Signer` (HSM or software) sign TUF
metadata; ``metadata.py`` builds and checks the four top-level roles (pure, no I/O).
"""
