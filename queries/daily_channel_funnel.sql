-- The engagement funnel per UTC day and channel, in distinct customers. The
-- stages nest exactly as in daily_engagement_funnel, within one channel, so
-- every rate (stage / previous stage, or stage / active) is at most 100% for
-- each row and for any sum of rows. A customer seen on two channels counts
-- once in each.
SELECT
    date_trunc('day', event_time) AS day,
    channel,
    count(DISTINCT customer_id) AS active_customers,
    count(DISTINCT customer_id) FILTER (WHERE event_type IN ('user_login', 'view_tariffs', 'tariff_switch')) AS logged_in_customers,
    count(DISTINCT customer_id) FILTER (WHERE event_type IN ('view_tariffs', 'tariff_switch')) AS viewed_customers,
    count(DISTINCT customer_id) FILTER (WHERE event_type = 'tariff_switch') AS switched_customers,
    count(DISTINCT customer_id) FILTER (WHERE event_type = 'bill_payment') AS paid_customers
FROM events
GROUP BY date_trunc('day', event_time), channel
