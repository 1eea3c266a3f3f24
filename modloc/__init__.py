"""modloc: video temporal concept localization on YouTube-8M features (the MOD system).

Placeholder docstring, replaced below.
"""

from modloc._version import __version__

__all__ = ["__version__"]
