"""Referenced checkpoints (issue 17): where they live and how to read them without copying.

- ``parse_source_url`` / ``SourceRef``: ``s3://bucket/key`` and ``file:///abs/path`` URLs, validated.
- ``SourcePolicy``: local paths only under CKPTSCOPE_SOURCE_ROOTS (symlinks resolved, no escapes),
  buckets only from CKPTSCOPE_SOURCE_BUCKETS.
- ``SourceClient``: identity (``head``), one folder level (``list_dir``), byte ranges
  (``read_ranges``, ``copy_range``) from either kind of store, each read checked against the
  ``ObjectIdentity`` it was listed with. S3 settings come from the standard AWS environment.
"""

from __future__ import annotations

from .sources_aws import DEFAULT_REGION, S3Settings, s3_settings
from .sources_client import SourceClient
from .sources_local import MAX_DIR_ENTRIES
from .sources_policy import BUCKETS_SETTING, ROOTS_SETTING, SourcePolicy
from .sources_refs import ObjectIdentity, SourceRef, check_bucket_name, parse_source_url

__all__ = [
    "BUCKETS_SETTING",
    "DEFAULT_REGION",
    "MAX_DIR_ENTRIES",
    "ROOTS_SETTING",
    "ObjectIdentity",
    "S3Settings",
    "SourceClient",
    "SourcePolicy",
    "SourceRef",
    "check_bucket_name",
    "parse_source_url",
    "s3_settings",
]
