-- Exact count(DISTINCT) keeps each KPI's members in an append-only log
-- (kpi_members_<kpi>_s<i>), decided in the consumer's memory. Writers of a
-- KPI serialise on its row here: each batch increments member_gen, and its
-- log rows carry that generation, so a consumer that finds another value
-- than it expects reads the rows it missed. A backfill rebuilds the logs and
-- sets a new member_epoch, so every memory of the old ones starts over.
ALTER TABLE kpi_registry
    ADD COLUMN member_epoch bigint NOT NULL DEFAULT 0,
    ADD COLUMN member_gen   bigint NOT NULL DEFAULT 0;
