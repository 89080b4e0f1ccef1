#!/usr/bin/env bash
# Runs once, when the postgres container initialises an empty data volume
# (mounted into /docker-entrypoint-initdb.d by docker-compose.yml).
#
# Creates grafana_reader, the login Grafana's PostgreSQL datasource uses:
# it may connect to the energy database and read every table and view in
# schema public, including those the pipeline creates later as `energy`
# (migrations, KPI tables, views, and the fresh tables a KPI backfill swaps
# in), and nothing else. Its sessions are read-only and time-limited.
#
# Password: GRAFANA_DB_PASSWORD (default "grafana"), passed to psql as a
# variable so that it is quoted as a literal, whatever it contains.
set -euo pipefail

psql -v ON_ERROR_STOP=1 \
  --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  --set=reader_password="${GRAFANA_DB_PASSWORD:-grafana}" \
  --set=db="$POSTGRES_DB" \
  --set=owner="$POSTGRES_USER" <<'SQL'
CREATE ROLE grafana_reader LOGIN PASSWORD :'reader_password'
  NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOINHERIT;
ALTER ROLE grafana_reader SET default_transaction_read_only = on;
ALTER ROLE grafana_reader SET statement_timeout = '30s';

GRANT CONNECT ON DATABASE :"db" TO grafana_reader;
GRANT USAGE ON SCHEMA public TO grafana_reader;
-- Anything that already exists (nothing on a fresh volume) ...
GRANT SELECT ON ALL TABLES IN SCHEMA public TO grafana_reader;
-- ... and every table and view the pipeline creates from now on.
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
  GRANT SELECT ON TABLES TO grafana_reader;
SQL
