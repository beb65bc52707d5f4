"""Label Studio projects and the task ledger.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('ls_projects',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('task', sa.String(length=32), nullable=False),
    sa.Column('ls_url', sa.String(length=500), nullable=False),
    sa.Column('ls_project_id', sa.Integer(), nullable=False),
    sa.Column('title', sa.String(length=200), nullable=False),
    sa.Column('classes', sa.JSON(), nullable=False),
    sa.Column('watermark', sa.DateTime(timezone=True), nullable=True),
    sa.Column('webhook_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_ls_projects_dataset_id_datasets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ls_projects')),
    sa.UniqueConstraint('dataset_id', 'task', 'ls_url', name='uq_ls_projects_dataset_task_url')
    )
    op.create_index(op.f('ix_ls_projects_dataset_id'), 'ls_projects', ['dataset_id'], unique=False)
    op.create_table('ls_tasks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=True),
    sa.Column('ls_task_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.Enum('pushed', 'labelled', 'skipped', 'orphaned', name='labeltaskstatus', native_enum=False, length=32), nullable=False),
    sa.Column('model_version', sa.String(length=200), nullable=True),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_ls_tasks_image_id_images'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['project_id'], ['ls_projects.id'], name=op.f('fk_ls_tasks_project_id_ls_projects'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ls_tasks')),
    sa.UniqueConstraint('project_id', 'image_id', name='uq_ls_tasks_project_image'),
    sa.UniqueConstraint('project_id', 'ls_task_id', name='uq_ls_tasks_project_task')
    )
    op.create_index(op.f('ix_ls_tasks_project_id'), 'ls_tasks', ['project_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_ls_tasks_project_id'), table_name='ls_tasks')
    op.drop_table('ls_tasks')
    op.drop_index(op.f('ix_ls_projects_dataset_id'), table_name='ls_projects')
    op.drop_table('ls_projects')
