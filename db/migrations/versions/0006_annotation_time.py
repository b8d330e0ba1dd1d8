"""The annotation_time table: active seconds of every annotation save (the cost model's data).

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "annotation_time",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("annotator_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("upgrade", sa.String(length=32), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["annotator_id"], ["annotator.id"], name=op.f("fk_annotation_time_annotator_id_annotator")),
        sa.ForeignKeyConstraint(["image_id"], ["image.id"], name=op.f("fk_annotation_time_image_id_image"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["project_id"], ["project.id"], name=op.f("fk_annotation_time_project_id_project"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annotation_time")),
    )
    op.create_index(op.f("ix_annotation_time_image_id"), "annotation_time", ["image_id"], unique=False)
    op.create_index(op.f("ix_annotation_time_project_id_upgrade"), "annotation_time", ["project_id", "upgrade"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_annotation_time_project_id_upgrade"), table_name="annotation_time")
    op.drop_index(op.f("ix_annotation_time_image_id"), table_name="annotation_time")
    op.drop_table("annotation_time")
