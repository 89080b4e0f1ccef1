-- Which KPI definitions the KPI tables hold: a changed file (another hash)
-- is backfilled from events before new batches merge into it.
CREATE TABLE kpi_registry (
    name           text PRIMARY KEY,
    sql_hash       text        NOT NULL,
    sql            text        NOT NULL,
    backfilled_at  timestamptz NOT NULL DEFAULT now()
);
