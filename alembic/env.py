"""Alembic environment for the spectr registry (target: spectr.registry.models' metadata)."""
from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from spectr.registry.db import lock_migrations, migration_engine
from spectr.registry.models import Base, UTCDateTime
from spectr.registry.settings import registry_url

config = context.config
# Only the CLI configures logging; programmatic calls (registry.db.upgrade) keep the caller's logging.
if config.config_file_name is not None and "url" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    return config.attributes.get("url") or config.get_main_option("sqlalchemy.url") or registry_url()


def _render_item(type_: str, obj, autogen_context):
    # Migrations spell the portable type, not our TypeDecorator, so they never import registry code.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        render_item=_render_item,
        **kwargs,
    )


def run_migrations_offline() -> None:
    url = _url()
    _configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = migration_engine(_url())
    try:
        with engine.connect() as connection:
            # SQLite's DDL is transactional once the driver leaves transactions to us (migration_engine);
            # alembic assumes it is not and would commit after each migration, letting another migrator in.
            _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite",
                       transactional_ddl=True, transaction_per_migration=False)
            with context.begin_transaction():
                lock_migrations(connection)  # one transaction, one migrator at a time
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
