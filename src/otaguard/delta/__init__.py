"""Delta updates: bsdiff-matched, LZMA2-compressed patches applied as a bounded-memory stream.

Release side: :func:`create_patch`. Device side: :class:`PatchApplier` / :func:`apply_patch`
(reads the active slot through a callback, writes the inactive slot sequentially). Format and
design rationale: ``otaguard.delta.format`` and docs/delta.md.
"""

from .apply import (
    DEFAULT_MAX_DICT_LOG,
    ApplyResult,
    PatchApplier,
    ReadOld,
    WriteNew,
    apply_patch,
    apply_patch_bytes,
)
from .create import create_patch
from .format import HEADER_MAX, PatchHeader, StreamInfo, patch_header

__all__ = [
    "DEFAULT_MAX_DICT_LOG",
    "HEADER_MAX",
    "ApplyResult",
    "PatchApplier",
    "PatchHeader",
    "ReadOld",
    "StreamInfo",
    "WriteNew",
    "apply_patch",
    "apply_patch_bytes",
    "create_patch",
    "patch_header",
]
