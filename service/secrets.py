"""``*_FILE`` variables: a setting's value read from a file (a Docker or Kubernetes
secret), so that a password is neither in the environment nor on a command line. No
dependencies: the worker, the dashboard command and the server all read them."""

from __future__ import annotations

from pathlib import Path


def read_secret_file(var: str, path: str) -> str:
    """The file's text without its final newline. A missing or unreadable file is a
    ``ValueError`` whose message is one line for a person."""
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"{var}={path}: cannot read it ({exc.strerror or exc})") from None
