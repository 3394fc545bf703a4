"""Throttle: login and signup rate-limit state, shared by every node on the database.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07

One row per throttled key (a failed-login counter per account and address, per address, an
account's bucket, an address the account logged in from, a signup bucket per address), named
by an HMAC of its parts under a secret the database does not hold: no username, address or
password is stored. Times are wall-clock seconds; ``expires`` drives the purge.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "throttle",
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("level", sa.Double(), nullable=False),
        sa.Column("touched", sa.Double(), nullable=False),
        sa.Column("locked_until", sa.Double(), nullable=False),
        sa.Column("expires", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "key_hash", name=op.f("pk_throttle")),
    )
    op.create_index(op.f("ix_throttle_expires"), "throttle", ["expires"])
    op.create_index(op.f("ix_throttle_scope_touched"), "throttle", ["scope", "touched"])


def downgrade() -> None:
    op.drop_index(op.f("ix_throttle_scope_touched"), table_name="throttle")
    op.drop_index(op.f("ix_throttle_expires"), table_name="throttle")
    op.drop_table("throttle")
