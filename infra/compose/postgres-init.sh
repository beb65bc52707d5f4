#!/bin/bash
# PostgreSQL init (docker-entrypoint-initdb.d: runs once, on an empty data directory): one role and
# one database for flawline's catalog, one for Label Studio. Passwords come from the environment.
# infra/k8s/postgres.yaml carries the same script (tests/test_infra.py checks they match).
set -euo pipefail
: "${CATALOG_DB_PASSWORD:?}" "${LABELSTUDIO_DB_PASSWORD:?}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v catalog_pw="$CATALOG_DB_PASSWORD" -v labelstudio_pw="$LABELSTUDIO_DB_PASSWORD" <<'SQL'
CREATE ROLE flawline LOGIN PASSWORD :'catalog_pw';
CREATE DATABASE flawline OWNER flawline;
CREATE ROLE labelstudio LOGIN PASSWORD :'labelstudio_pw';
CREATE DATABASE labelstudio OWNER labelstudio;
SQL
