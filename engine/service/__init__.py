"""The gRPC server: ``modloc.v1.Localization`` (and KServe v2, health, reflection, metrics).

:mod:`~modloc.engine.service.config` (settings), :mod:`~modloc.engine.service.core` (the engine core the
handlers talk to), :mod:`~modloc.engine.service.handlers` (the asyncio front), :mod:`~modloc.engine.service.app`
(``serve``: the process, signals, drain). grpcio is imported only when this package is.
"""
