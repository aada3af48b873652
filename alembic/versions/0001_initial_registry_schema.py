"""initial registry schema: base models, adapters, immutable versions, spectra, ingestion runs

Revision ID: 0001
Revises:
Create Date: 2026-11-29

Hand-checked against registry.models (names follow its naming convention). adapter_versions rows
are immutable: the ORM refuses updates and deletes, and a trigger refuses UPDATE at the database
level (SQLite and PostgreSQL).
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)
_IMMUTABLE_MSG = "adapter_versions rows are immutable; add a new version instead"


def upgrade() -> None:
    op.create_table(
        "base_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=512), nullable=False),
        sa.Column("architecture", sa.String(length=255), nullable=False),
        sa.Column("model_type", sa.String(length=255), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("config_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_base_models")),
        sa.UniqueConstraint("name", name=op.f("uq_base_models_name")),
    )
    op.create_table(
        "ingestion_runs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("finished_at", _TS, nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("sources", sa.JSON(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("accepted", sa.Integer(), nullable=False),
        sa.Column("rejected", sa.Integer(), nullable=False),
        sa.Column("new_versions", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingestion_runs")),
    )
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("base_model_id", sa.Integer(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["base_model_id"], ["base_models.id"], name=op.f("fk_adapters_base_model_id_base_models")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
        sa.UniqueConstraint("name", name=op.f("uq_adapters_name")),
    )
    op.create_index(op.f("ix_adapters_base_model_id"), "adapters", ["base_model_id"])

    op.create_table(
        "ingestion_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("warnings", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["ingestion_runs.id"], name=op.f("fk_ingestion_results_run_id_ingestion_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingestion_results")),
    )
    op.create_index(op.f("ix_ingestion_results_run_id"), "ingestion_results", ["run_id"])

    op.create_table(
        "adapter_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("revision", sa.String(length=255), nullable=True),
        sa.Column("content_sha256", sa.String(length=64), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("target_modules", sa.JSON(), nullable=False),
        sa.Column("modules_to_save", sa.JSON(), nullable=False),
        sa.Column("n_modules", sa.Integer(), nullable=False),
        sa.Column("dense", sa.Boolean(), nullable=False),
        sa.Column("ingestion_run_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["adapters.id"], name=op.f("fk_adapter_versions_adapter_id_adapters")
        ),
        sa.ForeignKeyConstraint(
            ["ingestion_run_id"],
            ["ingestion_runs.id"],
            name=op.f("fk_adapter_versions_ingestion_run_id_ingestion_runs"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapter_versions")),
        sa.UniqueConstraint(
            "adapter_id", "content_sha256", name=op.f("uq_adapter_versions_adapter_id_content_sha256")
        ),
        sa.UniqueConstraint("adapter_id", "version", name=op.f("uq_adapter_versions_adapter_id_version")),
    )
    op.create_index(op.f("ix_adapter_versions_ingestion_run_id"), "adapter_versions", ["ingestion_run_id"])

    op.create_table(
        "spectra",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("blob_sha256", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("params_sha256", sa.String(length=64), nullable=False),
        sa.Column("energy", sa.Float(), nullable=False),
        sa.Column("n_modules", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"], ["adapter_versions.id"], name=op.f("fk_spectra_version_id_adapter_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_spectra")),
        sa.UniqueConstraint(
            "version_id", "method", "params_sha256", name=op.f("uq_spectra_version_id_method_params_sha256")
        ),
    )
    op.create_index(op.f("ix_spectra_blob_sha256"), "spectra", ["blob_sha256"])

    _create_immutability_trigger()


def downgrade() -> None:
    _drop_immutability_trigger()
    op.drop_index(op.f("ix_spectra_blob_sha256"), table_name="spectra")
    op.drop_table("spectra")
    op.drop_index(op.f("ix_adapter_versions_ingestion_run_id"), table_name="adapter_versions")
    op.drop_table("adapter_versions")
    op.drop_index(op.f("ix_ingestion_results_run_id"), table_name="ingestion_results")
    op.drop_table("ingestion_results")
    op.drop_index(op.f("ix_adapters_base_model_id"), table_name="adapters")
    op.drop_table("adapters")
    op.drop_table("ingestion_runs")
    op.drop_table("base_models")


def _create_immutability_trigger() -> None:
    dialect = op.get_context().dialect.name
    if dialect == "sqlite":
        op.execute(
            "CREATE TRIGGER trg_adapter_versions_immutable BEFORE UPDATE ON adapter_versions "
            f"BEGIN SELECT RAISE(ABORT, '{_IMMUTABLE_MSG}'); END"
        )
    elif dialect == "postgresql":
        op.execute(
            "CREATE FUNCTION adapter_versions_immutable() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{_IMMUTABLE_MSG}'; END $$"
        )
        op.execute(
            "CREATE TRIGGER trg_adapter_versions_immutable BEFORE UPDATE ON adapter_versions "
            "FOR EACH ROW EXECUTE FUNCTION adapter_versions_immutable()"
        )
    # Other databases rely on the ORM's before_update guard in registry.models.


def _drop_immutability_trigger() -> None:
    dialect = op.get_context().dialect.name
    if dialect == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS trg_adapter_versions_immutable")
    elif dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS trg_adapter_versions_immutable ON adapter_versions")
        op.execute("DROP FUNCTION IF EXISTS adapter_versions_immutable()")
