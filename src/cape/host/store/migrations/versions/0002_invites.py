"""Invites: single-use, expiring signup codes, stored as SHA-256 hashes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07

``cape serve --signup invite`` accepts a signup only with an unused, unexpired code made by
``cape admin invite create``; ``used_by`` names the account it made (null once that account
is deleted).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "invites",
        sa.Column("id", sa.String(length=22), nullable=False),
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("note", sa.String(length=200), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("expires_at", _timestamp(), nullable=False),
        sa.Column("used_at", _timestamp(), nullable=True),
        sa.Column("used_by", sa.String(length=22), nullable=True),
        sa.ForeignKeyConstraint(
            ["used_by"], ["users.id"], name=op.f("fk_invites_used_by_users"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invites")),
        sa.UniqueConstraint("code_hash", name=op.f("uq_invites_code_hash")),
    )


def downgrade() -> None:
    op.drop_table("invites")
