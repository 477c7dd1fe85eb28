"""The one error type of the sidecar's configuration, in a leaf module every section's parser imports.

Kept free of imports so `outrider.sidecar.config` and the per-area `config.py` files never import each other.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key, the value and what is allowed."""
