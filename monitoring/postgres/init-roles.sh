#!/usr/bin/env bash
# Runs once, when the postgres container initialises an empty data volume
# (mounted into /docker-entrypoint-initdb.d by docker-compose.yml).
#
# Three roles (README: Roles):
#   energy          the owner (POSTGRES_USER); the `migrate` service runs as it
#                   and creates the schema, the KPI tables and the grants.
#   energy_app      the consumers' login. `migrate --grant-app energy_app`
#                   lets it read and write rows of the pipeline's tables and
#                   nothing else: no DDL, no TRUNCATE, no DROP.
#   grafana_reader  Grafana's PostgreSQL datasource: read-only, time-limited
#                   sessions, SELECT on every table and view of schema public,
#                   including those created later by the owner.
#
# Passwords: APP_DB_PASSWORD (default "energy_app") and GRAFANA_DB_PASSWORD
# (default "grafana"), passed to psql as variables so that they are quoted as
# literals, whatever they contain.
set -euo pipefail

psql -v ON_ERROR_STOP=1 \
  --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  --set=app_password="${APP_DB_PASSWORD:-energy_app}" \
  --set=reader_password="${GRAFANA_DB_PASSWORD:-grafana}" \
  --set=db="$POSTGRES_DB" \
  --set=owner="$POSTGRES_USER" <<'SQL'
CREATE ROLE energy_app LOGIN PASSWORD :'app_password'
  NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION;
GRANT CONNECT ON DATABASE :"db" TO energy_app;

CREATE ROLE grafana_reader LOGIN PASSWORD :'reader_password'
  NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOINHERIT;
ALTER ROLE grafana_reader SET default_transaction_read_only = on;
ALTER ROLE grafana_reader SET statement_timeout = '30s';

GRANT CONNECT ON DATABASE :"db" TO grafana_reader;
GRANT USAGE ON SCHEMA public TO grafana_reader;
-- Anything that already exists (nothing on a fresh volume) ...
GRANT SELECT ON ALL TABLES IN SCHEMA public TO grafana_reader;
-- ... and every table and view the owner creates from now on.
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
  GRANT SELECT ON TABLES TO grafana_reader;
SQL
