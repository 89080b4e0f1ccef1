-- Per UTC hour and channel: traffic, reach, logins, switches and bill revenue.
SELECT
    date_trunc('hour', event_time) AS hour,
    channel,
    count(*) AS events,
    count(DISTINCT customer_id) AS distinct_customers,
    count(*) FILTER (WHERE event_type = 'user_login') AS logins,
    count(*) FILTER (WHERE event_type = 'tariff_switch') AS switches,
    count(*) FILTER (WHERE event_type = 'tariff_switch' AND tariff_type = 'green') AS green_switches,
    coalesce(sum(payment_amount) FILTER (WHERE event_type = 'bill_payment'), 0) AS revenue,
    count(*) FILTER (WHERE event_type = 'bill_payment') AS payments
FROM events
GROUP BY date_trunc('hour', event_time), channel
