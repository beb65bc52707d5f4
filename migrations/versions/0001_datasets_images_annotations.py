"""Datasets, images and annotations.

Revision ID: 0001
Revises: None
Create Date: 2026-11-22
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('datasets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('layout', sa.String(length=50), nullable=True),
    sa.Column('source_uri', sa.Text(), nullable=True),
    sa.Column('split_info', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_datasets')),
    sa.UniqueConstraint('name', name=op.f('uq_datasets_name'))
    )

    op.create_table('images',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('object_key', sa.String(length=512), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('byte_size', sa.BigInteger(), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('channels', sa.Integer(), nullable=False),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('split', sa.Enum('train', 'val', 'test', name='split', native_enum=False, length=32), nullable=True),
    sa.Column('origin', sa.Text(), nullable=True),
    sa.Column('attrs', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_images_dataset_id_datasets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_images')),
    sa.UniqueConstraint('dataset_id', 'content_hash', name='uq_images_dataset_hash')
    )
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_images_dataset_id'), ['dataset_id'], unique=False)
        batch_op.create_index('ix_images_dataset_split', ['dataset_id', 'split'], unique=False)

    op.create_table('annotations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('label', sa.Enum('normal', 'defect', name='label', native_enum=False, length=32), nullable=True),
    sa.Column('defect_class', sa.String(length=100), nullable=True),
    sa.Column('mask_key', sa.String(length=512), nullable=True),
    sa.Column('boxes', sa.JSON(), nullable=True),
    sa.Column('confidence', sa.Float(), nullable=True),
    sa.Column('source', sa.Enum('human', 'pseudo', 'synthetic', 'imported', name='annotationsource', native_enum=False, length=32), nullable=False),
    sa.Column('annotator', sa.String(length=200), nullable=True),
    sa.Column('attrs', sa.JSON(), nullable=True),
    sa.Column('ls_task_id', sa.Integer(), nullable=True),
    sa.Column('ls_annotation_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_annotations_image_id_images'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_annotations'))
    )
    with op.batch_alter_table('annotations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_annotations_image_id'), ['image_id'], unique=False)
        batch_op.create_index('ix_annotations_ls', ['ls_task_id', 'ls_annotation_id'], unique=False)


def downgrade() -> None:
    op.drop_table('annotations')
    op.drop_table('images')
    op.drop_table('datasets')
