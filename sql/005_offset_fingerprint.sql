-- What the last message consumed from each partition was, beside its next
-- offset: on assignment the consumer compares the message at next_offset - 1
-- with it before reading on, so that a log which is not the one these offsets
-- count (a topic deleted and created again, a mirror, a broker that lost its
-- log) is refused instead of being skipped into. NULL fingerprint: written
-- before this migration, nothing to compare.
ALTER TABLE consumer_offsets
    -- Its Kafka timestamp in milliseconds; NULL when it had none.
    ADD COLUMN last_timestamp_ms bigint,
    -- The first 8 bytes of the SHA-256 of its value (tagged, so that a
    -- tombstone differs from an empty value).
    ADD COLUMN last_fingerprint bigint;
