"""fitnas service: the FastAPI app, database models, scheduler, worker client and CLI.

Keep this package's import light: the worker (``fitnas[worker]``) imports
``service.worker`` and ``service.cli`` without the web stack installed.
"""
