"""Caches of what depends on the base weights alone (DESIGN.md: ``cache/``).

:class:`SpectralCache`: top singular triplets and full SVDs of base weights, on disk in the user
cache directory, keyed by content, shared by every adapter analysed against the same base.
"""

from lorascope.cache.spectral import DEFAULT_MAX_BYTES, SpectralCache, default_cache_dir

__all__ = ["SpectralCache", "default_cache_dir", "DEFAULT_MAX_BYTES"]
