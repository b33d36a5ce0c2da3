"""The application's own table, beside the outbox's ``jobs`` in the same database."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

orders = sa.Table(
    "orders",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("items", sa.Integer, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
)
