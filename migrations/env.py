"""Alembic environment for fitnas. Configured programmatically (see
``migrations.alembic_config``) so ``fitnas db upgrade`` works from an installed package.

Only ``fitnas_``-prefixed tables are ours; Optuna's tables (and its ``alembic_version``)
may share the database and are ignored both ways.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from service.models import PREFIX, VERSION_TABLE, Base, UTCDateTime

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from service.settings import get_settings  # the plain `alembic -c ...` case

    return get_settings().database_url


def include_name(name, type_, parent_names) -> bool:
    if type_ == "table":
        return bool(name) and name.startswith(PREFIX) and name != VERSION_TABLE
    return True


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    if type_ == "table":
        return name.startswith(PREFIX) and name != VERSION_TABLE
    return True


def render_item(type_, obj, autogen_context):
    # Migrations are frozen history: render our UTC type as the plain column type it is.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        include_object=include_object,
        render_item=render_item,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        compare_server_default=False,
    )


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        include_object=include_object,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
