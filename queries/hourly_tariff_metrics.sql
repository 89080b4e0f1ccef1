-- Per UTC hour and tariff type: views, switches, incentive claims, and how
-- many distinct customers viewed and switched.
SELECT
    date_trunc('hour', event_time) AS hour,
    tariff_type,
    count(*) FILTER (WHERE event_type = 'view_tariffs') AS views,
    count(*) FILTER (WHERE event_type = 'tariff_switch') AS switches,
    count(*) FILTER (WHERE event_type = 'incentive_claim') AS incentive_claims,
    count(DISTINCT customer_id) FILTER (WHERE event_type = 'view_tariffs') AS customers_viewed,
    count(DISTINCT customer_id) FILTER (WHERE event_type = 'tariff_switch') AS customers_switched
FROM events
WHERE tariff_type IS NOT NULL
GROUP BY date_trunc('hour', event_time), tariff_type
