"""Python modules generated from ``proto/`` at build time (see CMakeLists.txt)."""
