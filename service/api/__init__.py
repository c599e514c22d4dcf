"""The API server: the FastAPI app (``service.api.app``), its request-time dependencies
(``deps``), the routes (``routes/``), the REST schemas and the Prometheus metrics.

Needs ``fitnas[server]``; the worker never imports this package.
"""
