-- Read-side views with the old prototype's names and meaning, computed from
-- events so they are exact whatever KPI files are installed. The prototype's
-- bugs are fixed: windows are based on time, not on row counts, and distinct
-- counts are never summed across periods.

-- One row per customer: activity, totals, and the current and previous tariff
-- (the tariffs of the latest and second-latest switch; ties broken by Kafka
-- position so the answer is deterministic).
CREATE VIEW customer_view AS
WITH switches AS (
    SELECT customer_id, tariff_type, event_time,
           row_number() OVER (PARTITION BY customer_id
                              ORDER BY event_time DESC, kafka_partition DESC, kafka_offset DESC) AS rn
    FROM events
    WHERE event_type = 'tariff_switch'
), per_customer AS (
    SELECT customer_id,
           min(event_time) AS first_seen,
           max(event_time) AS last_seen,
           count(*) AS events,
           count(DISTINCT session_id) AS sessions,
           count(*) FILTER (WHERE event_type = 'user_login') AS logins,
           count(*) FILTER (WHERE event_type = 'tariff_switch') AS tariff_switches,
           coalesce(sum(energy_consumed), 0) AS total_energy_consumed,
           coalesce(sum(payment_amount) FILTER (WHERE event_type = 'bill_payment'), 0) AS total_payments,
           count(*) FILTER (WHERE event_type = 'bill_payment') AS payment_events
    FROM events
    GROUP BY customer_id
)
SELECT c.*, cur.tariff_type AS current_tariff, prev.tariff_type AS previous_tariff,
       cur.event_time AS last_switch_at
FROM per_customer c
LEFT JOIN switches cur ON cur.customer_id = c.customer_id AND cur.rn = 1
LEFT JOIN switches prev ON prev.customer_id = c.customer_id AND prev.rn = 2;

-- Per UTC hour, totals over the 24 hours ending with that hour (a time-based
-- RANGE window: hours without events still count as zero, not as "a row").
CREATE VIEW rolling_24h_metrics AS
WITH hourly AS (
    SELECT date_trunc('hour', event_time) AS hour,
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

-- Per UTC day: energy and the day's activity.
CREATE VIEW daily_energy_summary AS
SELECT date_trunc('day', event_time)::date AS day,
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

-- The prototype's other name for the same summary.
CREATE VIEW daily_event_summary AS SELECT * FROM daily_energy_summary;
