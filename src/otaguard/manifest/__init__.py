"""IETF SUIT manifests: the otaguard profile model, builder, verifier and conditions."""

from .model import DeltaInfo, ManifestInfo

__all__ = ["DeltaInfo", "ManifestInfo"]
