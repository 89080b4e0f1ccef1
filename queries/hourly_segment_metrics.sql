-- Additive totals per UTC hour, channel, tariff type and event type: the
-- finest grain the dashboards filter on. Every measure is a count or a sum,
-- so any slice (one channel, some tariffs, a day) is an exact SUM over rows.
-- tariff_type is NULL for events that carry no tariff (logins, readings,
-- payments); a tariff filter therefore selects tariff events only.
SELECT
    date_trunc('hour', event_time) AS hour,
    channel,
    tariff_type,
    event_type,
    count(*) AS events,
    coalesce(sum(energy_consumed), 0) AS energy_consumed,
    coalesce(sum(payment_amount), 0) AS payment_amount
FROM events
GROUP BY date_trunc('hour', event_time), channel, tariff_type, event_type
