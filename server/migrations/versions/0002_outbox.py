"""PostgreSQL only: an outbox of committed changes, filled by triggers on the five tables.

Each row change records the table and the key columns of the row before and after, then NOTIFYs
`cacheaside_changes` with the schema name. The service drains the outbox and invalidates through
its map (server/domain/invalidation.py); rows stay until they are processed, so changes made while
no service listens are replayed when one starts. SQLite has no triggers of this kind here: writers
call Invalidate.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The columns the invalidation map reads, per table; tests check this stays in step with the map.
TRACKED_COLUMNS = {
    "users": ("id",),
    "profiles": ("user_id",),
    "user_settings": ("user_id",),
    "posts": ("id", "author_id"),
    "comments": ("id", "author_id"),
}

_FUNCTION = """
CREATE OR REPLACE FUNCTION cacheaside_record_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  old_row jsonb;
  new_row jsonb;
  old_keys jsonb;
  new_keys jsonb;
  col text;
BEGIN
  IF TG_OP <> 'INSERT' THEN
    old_row := to_jsonb(OLD);
    old_keys := '{}'::jsonb;
    FOREACH col IN ARRAY TG_ARGV LOOP
      old_keys := old_keys || jsonb_build_object(col, old_row -> col);
    END LOOP;
  END IF;
  IF TG_OP <> 'DELETE' THEN
    new_row := to_jsonb(NEW);
    new_keys := '{}'::jsonb;
    FOREACH col IN ARRAY TG_ARGV LOOP
      new_keys := new_keys || jsonb_build_object(col, new_row -> col);
    END LOOP;
  END IF;
  -- Qualified by the table's own schema: a writer's search_path must not decide where this goes.
  EXECUTE format('INSERT INTO %I.cacheaside_changes (table_name, old_keys, new_keys) VALUES ($1, $2, $3)',
                 TG_TABLE_SCHEMA)
    USING TG_TABLE_NAME, old_keys, new_keys;
  PERFORM pg_notify('cacheaside_changes', TG_TABLE_SCHEMA);
  RETURN NULL;
END
$$;
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE TABLE cacheaside_changes (
          id bigserial PRIMARY KEY,
          table_name text NOT NULL,
          old_keys jsonb,
          new_keys jsonb,
          changed_at timestamptz NOT NULL DEFAULT clock_timestamp()
        )
        """
    )
    op.execute(_FUNCTION)
    for table, columns in TRACKED_COLUMNS.items():
        arguments = ", ".join(f"'{column}'" for column in columns)
        op.execute(
            f"CREATE TRIGGER cacheaside_record_change AFTER INSERT OR UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION cacheaside_record_change({arguments})"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TRACKED_COLUMNS:
        op.execute(f"DROP TRIGGER IF EXISTS cacheaside_record_change ON {table}")
    op.execute("DROP FUNCTION IF EXISTS cacheaside_record_change()")
    op.execute("DROP TABLE IF EXISTS cacheaside_changes")
