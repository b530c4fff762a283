"""Alembic environment for mlplat's migrations.

mlplat runs these itself (``mlplat.db.migrate``) with a connection passed in
``config.attributes["connection"]``; the ``sqlalchemy.url`` main option serves
the Alembic command line.
"""
from alembic import context

from mlplat.db.engine import create_engine
from mlplat.db.models import Base


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
    with engine.begin() as conn:
        _run(conn)
