"""``python -m service.cli``: the same program as the ``fitnas`` script."""

from service.cli import main

main()
