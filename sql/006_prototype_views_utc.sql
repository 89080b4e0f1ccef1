-- The prototype views bucket by UTC hour and day, as their comments in 003
-- say: date_trunc and ::date of a timestamptz follow the reading session's
-- time zone, so a reader in New York (or Kathmandu, +05:45) got other days
-- and hours than a reader in UTC. Same columns and types, so the views are
-- replaced in place (daily_event_summary reads daily_energy_summary).

CREATE OR REPLACE VIEW rolling_24h_metrics AS
WITH hourly AS (
    SELECT date_trunc('hour', event_time AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour,
           count(*) AS events,
           count(*) FILTER (WHERE event_type = 'user_login') AS logins,
           count(*) FILTER (WHERE event_type = 'tariff_switch') AS tariff_switches,
           coalesce(sum(energy_consumed), 0) AS energy_consumed,
           coalesce(sum(payment_amount) FILTER (WHERE event_type = 'bill_payment'), 0) AS payments,
           count(*) FILTER (WHERE event_type = 'bill_payment') AS payment_events
    FROM events
    GROUP BY 1
)
SELECT hour,
       sum(events) OVER w AS events_24h,
       sum(logins) OVER w AS logins_24h,
       sum(tariff_switches) OVER w AS tariff_switches_24h,
       sum(energy_consumed) OVER w AS energy_consumed_24h,
       sum(payments) OVER w AS payments_24h,
       sum(payment_events) OVER w AS payment_events_24h
FROM hourly
WINDOW w AS (ORDER BY hour RANGE BETWEEN INTERVAL '23 hours' PRECEDING AND CURRENT ROW);

CREATE OR REPLACE VIEW daily_energy_summary AS
SELECT (event_time AT TIME ZONE 'UTC')::date AS day,
       count(*) AS events,
       count(DISTINCT customer_id) AS active_customers,
       count(*) FILTER (WHERE event_type = 'energy_consumed') AS energy_readings,
       coalesce(sum(energy_consumed), 0) AS total_energy_consumed,
       coalesce(round(avg(energy_consumed) FILTER (WHERE event_type = 'energy_consumed'), 3), 0) AS avg_energy_per_reading,
       coalesce(max(energy_consumed), 0) AS peak_reading,
       count(*) FILTER (WHERE event_type = 'tariff_switch') AS tariff_switches,
       coalesce(sum(payment_amount) FILTER (WHERE event_type = 'bill_payment'), 0) AS total_payments
FROM events
GROUP BY 1;
