"""DICOM archive provenance of images imported over DICOMweb (UIDs, modality, transfer syntax, window).

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dicom_instance",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("transfer_syntax", sa.String(length=64), nullable=True),
        sa.Column("window_center", sa.Float(), nullable=True),
        sa.Column("window_width", sa.Float(), nullable=True),
        sa.Column("archive", sa.String(length=1024), nullable=True),
        sa.ForeignKeyConstraint(["image_id"], ["image.id"], name=op.f("fk_dicom_instance_image_id_image"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("image_id", name=op.f("pk_dicom_instance")),
    )
    with op.batch_alter_table("dicom_instance", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_dicom_instance_sop_uid"), ["sop_uid"], unique=False)
        batch_op.create_index(batch_op.f("ix_dicom_instance_study_uid"), ["study_uid"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("dicom_instance", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dicom_instance_study_uid"))
        batch_op.drop_index(batch_op.f("ix_dicom_instance_sop_uid"))
    op.drop_table("dicom_instance")
