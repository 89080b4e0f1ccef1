-- The engagement funnel per UTC day, in distinct customers. Each stage is
-- defined on a subset of the customers of the stage before it, so no stage
-- can exceed the previous one:
--   active     any valid event that day;
--   logged_in  a login, or a tariff view or switch (which need a session);
--   viewed     a tariff view, or a switch (which needs a view);
--   switched   a tariff switch;
--   paid       a bill payment (a subset of active; a branch, not after switched).
SELECT
    date_trunc('day', event_time) AS day,
    count(DISTINCT customer_id) AS active_customers,
    count(DISTINCT customer_id) FILTER (WHERE event_type IN ('user_login', 'view_tariffs', 'tariff_switch')) AS logged_in_customers,
    count(DISTINCT customer_id) FILTER (WHERE event_type IN ('view_tariffs', 'tariff_switch')) AS viewed_customers,
    count(DISTINCT customer_id) FILTER (WHERE event_type = 'tariff_switch') AS switched_customers,
    count(DISTINCT customer_id) FILTER (WHERE event_type = 'bill_payment') AS paid_customers
FROM events
GROUP BY date_trunc('day', event_time)
