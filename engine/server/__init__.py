"""The gRPC server: ``modloc.v1.Localization`` (and KServe v2, health, reflection, metrics).

:mod:`~engine.server.config` (settings), :mod:`~engine.server.core` (the engine core the
handlers talk to), :mod:`~engine.server.service` (the asyncio front), :mod:`~engine.server.app`
(``serve``: the process, signals, drain). grpcio is imported only when this package is.
"""
