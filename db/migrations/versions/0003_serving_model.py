"""The serving model version of each project (candidates vs serving, promote/rollback).

Existing stores keep what they showed before: the newest ready version of each project serves.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "serving_model",
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("annotator_id", sa.Integer(), nullable=False),
        sa.Column("since", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["annotator_id"], ["annotator.id"], name=op.f("fk_serving_model_annotator_id_annotator")),
        sa.ForeignKeyConstraint(["model_version_id"], ["model_version.id"],
                                name=op.f("fk_serving_model_model_version_id_model_version"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["project_id"], ["project.id"], name=op.f("fk_serving_model_project_id_project"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("project_id", name=op.f("pk_serving_model")),
    )
    # Keep today's behaviour for existing stores: the newest ready version of each project serves.
    bind = op.get_bind()
    newest = bind.execute(sa.text(
        "SELECT project_id, MAX(id) FROM model_version WHERE status = 'ready' GROUP BY project_id"
    )).all()
    if newest:
        annotator = bind.execute(sa.text("SELECT id FROM annotator WHERE name = 'migration'")).scalar()
        if annotator is None:
            bind.execute(sa.text("INSERT INTO annotator (name, kind) VALUES ('migration', 'system')"))
            annotator = bind.execute(sa.text("SELECT id FROM annotator WHERE name = 'migration'")).scalar()
        now = sa.func.now()
        serving = sa.table("serving_model", sa.column("project_id"), sa.column("model_version_id"),
                           sa.column("annotator_id"), sa.column("since", sa.DateTime()))
        for project_id, version_id in newest:
            bind.execute(serving.insert().values(project_id=project_id, model_version_id=version_id,
                                                 annotator_id=annotator, since=now))


def downgrade() -> None:
    op.drop_table("serving_model")
