"""modloc engine: YouTube-8M formats, metrics, and the localization runtime.

This package never imports ``training`` or ``export`` at module level: a serving install
needs no training code.
"""

__version__ = "0.1.0"
