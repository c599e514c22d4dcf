"""(commands registered by this module)"""

import typer


def register(app: typer.Typer) -> None:
    pass
