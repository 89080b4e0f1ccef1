-- Core tables: raw events, rejects and the consumed offsets.
-- Postgres is the source of truth for offsets: a batch's rows, its rejects and
-- its next offsets commit in one transaction, so they can never disagree.

CREATE TABLE events (
    kafka_partition  integer      NOT NULL,
    kafka_offset     bigint       NOT NULL,
    kafka_timestamp  timestamptz,
    event_type       text         NOT NULL,
    event_time       timestamptz  NOT NULL,
    customer_id      text         NOT NULL,
    session_id       bigint       NOT NULL,
    channel          text         NOT NULL,
    tariff_type      text,
    energy_consumed  numeric(10,3),
    payment_amount   numeric(10,2),
    created_at       timestamptz  NOT NULL DEFAULT now(),
    -- One row per Kafka message: a replayed message can never land twice.
    PRIMARY KEY (kafka_partition, kafka_offset)
);

-- Time-range scans (dashboards, rolling views, backfills) need an index on
-- event_time, but a b-tree on it costs COPY far more than BRIN does. Events
-- arrive roughly in time order, which is the case BRIN is made for.
CREATE INDEX events_event_time_brin ON events USING brin (event_time) WITH (pages_per_range = 32);

CREATE TABLE rejected_events (
    kafka_partition  integer      NOT NULL,
    kafka_offset     bigint       NOT NULL,
    kafka_timestamp  timestamptz,
    reason           text         NOT NULL,
    detail           text,
    -- The message exactly as consumed; NULL only for a tombstone.
    raw_payload      bytea,
    topic            text         NOT NULL,
    rejected_at      timestamptz  NOT NULL DEFAULT now(),
    PRIMARY KEY (kafka_partition, kafka_offset)
);
CREATE INDEX rejected_events_reason ON rejected_events (reason);

CREATE TABLE consumer_offsets (
    group_id         text         NOT NULL,
    topic            text         NOT NULL,
    kafka_partition  integer      NOT NULL,
    -- The offset of the next message to consume (last written + 1).
    next_offset      bigint       NOT NULL,
    updated_at       timestamptz  NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, kafka_partition)
);
