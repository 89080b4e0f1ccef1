-- Business KPIs per UTC hour, with the old prototype's 16 column names.
-- Ratios are 0 when their denominator is 0; money has 2 decimals, energy 3.
SELECT
    date_trunc('hour', event_time) AS hour,
    count(*) FILTER (WHERE event_type = 'tariff_switch') AS tariff_switches,
    coalesce(sum(payment_amount) FILTER (WHERE event_type = 'tariff_switch'), 0) AS total_switch_revenue,
    coalesce(round(sum(payment_amount) FILTER (WHERE event_type = 'tariff_switch')
        / nullif(count(*) FILTER (WHERE event_type = 'tariff_switch'), 0), 2), 0) AS avg_switch_value,
    count(*) FILTER (WHERE event_type = 'incentive_claim') AS incentive_claims,
    coalesce(sum(payment_amount) FILTER (WHERE event_type = 'incentive_claim'), 0) AS total_incentive_payouts,
    count(*) FILTER (WHERE event_type = 'tariff_switch' AND tariff_type = 'green') AS green_tariff_switches,
    count(DISTINCT customer_id) AS active_customers,
    count(DISTINCT session_id) FILTER (WHERE event_type = 'user_login') AS new_sessions,
    count(*) FILTER (WHERE event_type = 'user_login') AS total_logins,
    coalesce(sum(energy_consumed), 0) AS total_energy_consumed,
    coalesce(round(sum(energy_consumed) / nullif(count(DISTINCT customer_id), 0), 3), 0) AS avg_consumption_per_customer,
    coalesce(max(energy_consumed), 0) AS peak_hour_usage,
    coalesce(sum(payment_amount) FILTER (WHERE event_type = 'bill_payment'), 0) AS total_payments,
    count(*) FILTER (WHERE event_type = 'bill_payment') AS payment_events,
    coalesce(round(sum(payment_amount) FILTER (WHERE event_type = 'bill_payment')
        / nullif(count(*) FILTER (WHERE event_type = 'bill_payment'), 0), 2), 0) AS avg_payment_amount
FROM events
GROUP BY date_trunc('hour', event_time)
