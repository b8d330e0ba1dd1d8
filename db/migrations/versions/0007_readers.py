"""Several readers per image: the project setting readers_per_image, each reader's blind read
(reading), per-reader leases (reader_lease) and the review state of an image (image_review).

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.add_column(sa.Column("readers_per_image", sa.Integer(), server_default="1", nullable=False))
    op.create_table(
        "reading",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("annotator_id", sa.Integer(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("no_finding", sa.Boolean(), nullable=False),
        sa.Column("complete", sa.Boolean(), nullable=False),
        sa.Column("boxes", sa.JSON(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("saved_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["annotator_id"], ["annotator.id"], name=op.f("fk_reading_annotator_id_annotator")),
        sa.ForeignKeyConstraint(["image_id"], ["image.id"], name=op.f("fk_reading_image_id_image"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reading")),
        sa.UniqueConstraint("image_id", "annotator_id", name=op.f("uq_reading_image_id_annotator_id")),
    )
    op.create_index(op.f("ix_reading_image_id"), "reading", ["image_id"], unique=False)
    op.create_table(
        "reader_lease",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("annotator_id", sa.Integer(), nullable=False),
        sa.Column("taken_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["annotator_id"], ["annotator.id"], name=op.f("fk_reader_lease_annotator_id_annotator")),
        sa.ForeignKeyConstraint(["image_id"], ["image.id"], name=op.f("fk_reader_lease_image_id_image"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("image_id", "annotator_id", name=op.f("pk_reader_lease")),
    )
    op.create_index(op.f("ix_reader_lease_expires_at"), "reader_lease", ["expires_at"], unique=False)
    op.create_table(
        "image_review",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("disagree", sa.Boolean(), nullable=False),
        sa.Column("reviewer_id", sa.Integer(), nullable=True),
        sa.Column("sources", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["image.id"], name=op.f("fk_image_review_image_id_image"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["reviewer_id"], ["annotator.id"], name=op.f("fk_image_review_reviewer_id_annotator")),
        sa.PrimaryKeyConstraint("image_id", name=op.f("pk_image_review")),
    )
    op.create_index(op.f("ix_image_review_status_disagree"), "image_review", ["status", "disagree"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_image_review_status_disagree"), table_name="image_review")
    op.drop_table("image_review")
    op.drop_index(op.f("ix_reader_lease_expires_at"), table_name="reader_lease")
    op.drop_table("reader_lease")
    op.drop_index(op.f("ix_reading_image_id"), table_name="reading")
    op.drop_table("reading")
    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.drop_column("readers_per_image")
