"""The HTTP routes, one module per resource: ``jobs`` (users), ``workers`` (targets and
worker registration) and ``tasks`` (the lease protocol, worker tokens only)."""
