"""expert lifecycle: kept adapter files, aliases (with their audit log), tags, bundles, flow run ids

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

Every new fact lives in a table of its own: adapter_versions rows stay immutable (0001's trigger is
untouched). The only change to an existing table is a nullable ingestion_runs.flow_run_id.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def _fk(table: str, column: str, target: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], [f"{target}.id"], name=op.f(f"fk_{table}_{column}_{target}"))


def upgrade() -> None:
    op.create_table(
        "adapter_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("blob_sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        _fk("adapter_files", "version_id", "adapter_versions"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapter_files")),
        sa.UniqueConstraint("version_id", "filename", name=op.f("uq_adapter_files_version_id_filename")),
    )
    op.create_index(op.f("ix_adapter_files_blob_sha256"), "adapter_files", ["blob_sha256"])

    op.create_table(
        "aliases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("alias", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("updated_by", sa.String(length=255), nullable=False),
        _fk("aliases", "adapter_id", "adapters"),
        _fk("aliases", "version_id", "adapter_versions"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_aliases")),
        sa.UniqueConstraint("adapter_id", "alias", name=op.f("uq_aliases_adapter_id_alias")),
    )
    op.create_index(op.f("ix_aliases_version_id"), "aliases", ["version_id"])

    op.create_table(
        "alias_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("alias", sa.String(length=64), nullable=False),
        sa.Column("from_version", sa.Integer(), nullable=True),
        sa.Column("to_version", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("at", _TS, nullable=False),
        _fk("alias_events", "adapter_id", "adapters"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alias_events")),
    )
    op.create_index(op.f("ix_alias_events_adapter_id"), "alias_events", ["adapter_id"])

    op.create_table(
        "adapter_tags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        _fk("adapter_tags", "adapter_id", "adapters"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapter_tags")),
        sa.UniqueConstraint("adapter_id", "key", name=op.f("uq_adapter_tags_adapter_id_key")),
    )
    op.create_table(
        "version_tags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        _fk("version_tags", "version_id", "adapter_versions"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_version_tags")),
        sa.UniqueConstraint("version_id", "key", name=op.f("uq_version_tags_version_id_key")),
    )

    op.create_table(
        "bundles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("base_model_id", sa.Integer(), nullable=False),
        sa.Column("router", sa.JSON(), nullable=False),
        sa.Column("spectra_sha256", sa.String(length=64), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        _fk("bundles", "base_model_id", "base_models"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bundles")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_bundles_name_version")),
    )
    op.create_index(op.f("ix_bundles_base_model_id"), "bundles", ["base_model_id"])
    op.create_table(
        "bundle_experts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("selector", sa.String(length=512), nullable=False),
        sa.Column("content_sha256", sa.String(length=64), nullable=False),
        sa.Column("spectra_blob_sha256", sa.String(length=64), nullable=False),
        _fk("bundle_experts", "bundle_id", "bundles"),
        _fk("bundle_experts", "version_id", "adapter_versions"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bundle_experts")),
        sa.UniqueConstraint("bundle_id", "position", name=op.f("uq_bundle_experts_bundle_id_position")),
    )
    op.create_index(op.f("ix_bundle_experts_version_id"), "bundle_experts", ["version_id"])

    # A plain ADD COLUMN on both databases (nullable, no default): no table rebuild.
    op.add_column("ingestion_runs", sa.Column("flow_run_id", sa.String(length=36), nullable=True))


def downgrade() -> None:
    # SQLite >= 3.35 drops a plain column in place; a batch rebuild would drop ingestion_runs, which
    # ingestion_results and adapter_versions reference.
    op.drop_column("ingestion_runs", "flow_run_id")
    op.drop_index(op.f("ix_bundle_experts_version_id"), table_name="bundle_experts")
    op.drop_table("bundle_experts")
    op.drop_index(op.f("ix_bundles_base_model_id"), table_name="bundles")
    op.drop_table("bundles")
    op.drop_table("version_tags")
    op.drop_table("adapter_tags")
    op.drop_index(op.f("ix_alias_events_adapter_id"), table_name="alias_events")
    op.drop_table("alias_events")
    op.drop_index(op.f("ix_aliases_version_id"), table_name="aliases")
    op.drop_table("aliases")
    op.drop_index(op.f("ix_adapter_files_blob_sha256"), table_name="adapter_files")
    op.drop_table("adapter_files")
