"""MCUboot image format: build (with any :class:`~otaguard.crypto.cose.Signer`) and verify.

Pure: bytes in, bytes out. It sits beside :mod:`otaguard.manifest` (``signing`` imports it; it
imports only ``crypto``, ``errors`` and the version parser), so the HSM signs MCUboot images
through the same Signer interface and the same service as SUIT manifests.
"""
