"""fitnas service: three programs over one shared core.

* ``service.api``: the API server (FastAPI app, dependencies, routes, schemas, metrics).
* ``service.worker``: the device worker (``fitnas worker``); imports with ``fitnas[worker]``.
* ``service.cli``: every ``fitnas`` command.

What the server side shares stays here: the database (``db``), ``models``, ``settings``,
``tokens``, ``leases``, the ``scheduler``, the measurement ``cache`` and ``studies``.
Keep this package's import light: the worker imports ``service.worker`` and
``service.cli`` without the web stack installed.
"""
