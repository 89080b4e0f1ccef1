//! Seeded synthetic event source: writes realistic energy-retailer events as JSONL
//! (daily load profile, customer sessions, channel and tariff mixes), optionally salted
//! with every kind of invalid line the ingest path has to reject. It owns only what the
//! events look like; how they are consumed and validated lives elsewhere.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::io::{BufWriter, Write};

use chrono::{DateTime, Datelike, FixedOffset, Months, TimeDelta, TimeZone, Timelike, Utc};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;

/// What to generate. `Default` gives a small week-long data set.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    /// Exact number of lines written (good + bad).
    pub events: u64,
    /// Customers `CUST00001 ..= CUST{customers}`.
    pub customers: u32,
    /// Event times fall in `[start, start + days)`.
    pub days: u32,
    pub start: DateTime<Utc>,
    pub seed: u64,
    /// Fraction of lines (rounded to a whole count) replaced by invalid lines.
    pub bad_ratio: f64,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            events: 10_000,
            customers: 200,
            days: 7,
            start: Utc
                .with_ymd_and_hms(2025, 6, 1, 0, 0, 0)
                .single()
                .expect("2025-06-01T00:00:00Z is a valid UTC instant"),
            seed: 42,
            bad_ratio: 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GenerateSummary {
    pub good: u64,
    pub bad: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("invalid generator settings: {0}")]
    InvalidConfig(String),
    #[error("cannot write events: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes exactly `cfg.events` JSONL lines to `out`.
///
/// The same config always yields byte-identical output (for a given `rand` version, which
/// `Cargo.lock` pins). Memory stays bounded by the number of sessions open at once plus one
/// entry per customer who switched tariff, not by `cfg.events`.
pub fn generate<W: Write>(cfg: &GenerateConfig, out: W) -> Result<GenerateSummary, GenerateError> {
    run(cfg, out).map(|report| report.summary)
}

/// Checks `cfg` the way [`generate`] does, without writing anything: so
/// that a bad option is refused before the output file is created (which
/// would empty the file already there).
pub fn check(cfg: &GenerateConfig) -> Result<(), GenerateError> {
    validate(cfg).map(|_| ())
}

// ---------------------------------------------------------------------------------------
// Vocabulary
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    UserLogin,
    UserLogout,
    ViewTariffs,
    TariffSwitch,
    EnergyConsumed,
    IncentiveClaim,
    BillPayment,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            Self::UserLogin => "user_login",
            Self::UserLogout => "user_logout",
            Self::ViewTariffs => "view_tariffs",
            Self::TariffSwitch => "tariff_switch",
            Self::EnergyConsumed => "energy_consumed",
            Self::IncentiveClaim => "incentive_claim",
            Self::BillPayment => "bill_payment",
        }
    }

    fn carries_tariff(self) -> bool {
        matches!(
            self,
            Self::ViewTariffs | Self::TariffSwitch | Self::IncentiveClaim
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    WebPortal,
    MobileApp,
    CallCenter,
}

impl Channel {
    fn as_str(self) -> &'static str {
        match self {
            Self::WebPortal => "web_portal",
            Self::MobileApp => "mobile_app",
            Self::CallCenter => "call_center",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tariff {
    Basic,
    Green,
    Premium,
}

impl Tariff {
    fn as_str(self) -> &'static str {
        match self {
            Self::Basic => "basic",
            Self::Green => "green",
            Self::Premium => "premium",
        }
    }
}

const CHANNEL_MIX: [(Channel, f64); 3] = [
    (Channel::WebPortal, 0.50),
    (Channel::MobileApp, 0.35),
    (Channel::CallCenter, 0.15),
];

const TARIFF_MIX: [(Tariff, f64); 3] = [
    (Tariff::Basic, 0.50),
    (Tariff::Green, 0.30),
    (Tariff::Premium, 0.20),
];

/// Relative pull of each tariff as a switch *target*: people mostly switch to green.
const SWITCH_TARGET_PULL: [(Tariff, f64); 3] = [
    (Tariff::Basic, 1.0),
    (Tariff::Green, 3.0),
    (Tariff::Premium, 1.5),
];

/// Household load by UTC hour (multiplier of the mean): low at night, a morning bump and
/// the evening peak that tariff and grid KPIs are usually about.
const LOAD_PROFILE: [f64; 24] = [
    0.45, 0.38, 0.34, 0.32, 0.33, 0.42, 0.70, 1.05, 1.20, 1.00, 0.85, 0.80, //
    0.82, 0.78, 0.75, 0.80, 0.95, 1.25, 1.55, 1.70, 1.60, 1.35, 1.00, 0.70,
];

/// Event density by UTC hour. Flatter than the load at night because meters keep
/// reporting while people sleep; peaks when people are awake and at home.
const DENSITY_PROFILE: [f64; 24] = [
    0.30, 0.22, 0.18, 0.16, 0.16, 0.22, 0.40, 0.75, 1.00, 1.00, 0.95, 0.90, //
    0.90, 0.85, 0.85, 0.90, 1.00, 1.20, 1.45, 1.55, 1.45, 1.20, 0.85, 0.50,
];

/// Mean hourly household consumption in kWh (about 3.5 MWh a year).
const MEAN_HOURLY_KWH: f64 = 0.40;

/// Share of "arrivals" that are meter readings rather than customer sessions; with the
/// session shape below this makes roughly 30% of all events `energy_consumed`.
const METER_READING_SHARE: f64 = 0.6;

/// Non-UTC offsets used for the occasional offset timestamp, in seconds east of UTC.
const OFFSETS: [i32; 5] = [3_600, 7_200, 19_800, -14_400, -25_200];

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_HOUR: i64 = 3_600 * MICROS_PER_SECOND;
const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;

/// One event before it is rendered; times are microseconds after `cfg.start` so the
/// pending-event heap compares plain integers.
#[derive(Debug, Clone)]
struct Event {
    at_us: i64,
    kind: EventType,
    /// 0-based; rendered 1-based as `CUST00001`.
    customer: u32,
    session: u64,
    channel: Channel,
    tariff: Option<Tariff>,
    energy_kwh: Option<f64>,
    amount_eur: Option<f64>,
}

fn customer_id(customer: u32) -> String {
    format!("CUST{:05}", u64::from(customer) + 1)
}

// ---------------------------------------------------------------------------------------
// Invalid lines
// ---------------------------------------------------------------------------------------

/// Every kind of invalid line the generator can emit. Bad lines are dealt from shuffled
/// decks of `ALL`, so each kind appears once per `ALL.len()` bad lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BadKind {
    MalformedJson,
    JsonArray,
    JsonScalar,
    MissingEventType,
    UnknownEventType,
    MissingEventTime,
    UnparseableEventTime,
    EventTimeBefore2000,
    EventTimeFarFuture,
    MissingCustomerId,
    MissingSessionId,
    MissingChannel,
    MissingTariffType,
    MissingEnergy,
    MissingPaymentAmount,
    NegativeNumber,
    NonNumericString,
    NonFiniteString,
    EmptyCustomerId,
    NonIntegerSessionId,
    /// An event whose `customer_id` holds a byte that is not UTF-8.
    NotUtf8,
    EmptyLine,
}

impl BadKind {
    pub(crate) const ALL: [BadKind; 22] = [
        Self::MalformedJson,
        Self::JsonArray,
        Self::JsonScalar,
        Self::MissingEventType,
        Self::UnknownEventType,
        Self::MissingEventTime,
        Self::UnparseableEventTime,
        Self::EventTimeBefore2000,
        Self::EventTimeFarFuture,
        Self::MissingCustomerId,
        Self::MissingSessionId,
        Self::MissingChannel,
        Self::MissingTariffType,
        Self::MissingEnergy,
        Self::MissingPaymentAmount,
        Self::NegativeNumber,
        Self::NonNumericString,
        Self::NonFiniteString,
        Self::EmptyCustomerId,
        Self::NonIntegerSessionId,
        Self::NotUtf8,
        Self::EmptyLine,
    ];
}

/// Result of a run including the per-kind tally of bad lines (indexed like `BadKind::ALL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Report {
    pub(crate) summary: GenerateSummary,
    pub(crate) bad_by_kind: [u64; BadKind::ALL.len()],
}

// ---------------------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------------------

pub(crate) fn run<W: Write>(cfg: &GenerateConfig, out: W) -> Result<Report, GenerateError> {
    let span_us = validate(cfg)?;
    let mut world = World::new(cfg, span_us);
    let mut emitter = Emitter::new(cfg, out);
    let mut pending: BinaryHeap<Reverse<Pending>> = BinaryHeap::new();
    let mut scheduled = 0u64;
    let mut seq = 0u64;

    // Arrival times come from the fraction of the event budget already scheduled, so the
    // run ends exactly at `cfg.events` lines and still spans the whole period. Arrivals
    // never go back in time because `scheduled` grows by at least 1 and the jitter is < 1.
    while scheduled < cfg.events {
        let fraction = (scheduled as f64 + world.rng.random::<f64>()) / cfg.events as f64;
        let at = world.clock.offset_at(fraction);
        while let Some(Reverse(next)) = pending.peek()
            && next.event.at_us <= at
        {
            if let Some(Reverse(next)) = pending.pop() {
                emitter.emit(&next.event)?;
            }
        }
        for event in world.next_activity(at, cfg.events - scheduled) {
            scheduled += 1;
            seq += 1;
            pending.push(Reverse(Pending { seq, event }));
        }
    }
    while let Some(Reverse(next)) = pending.pop() {
        emitter.emit(&next.event)?;
    }
    emitter.finish()
}

/// Returns the span of the period in microseconds.
fn validate(cfg: &GenerateConfig) -> Result<i64, GenerateError> {
    let invalid = |msg: String| Err(GenerateError::InvalidConfig(msg));
    if cfg.customers == 0 {
        return invalid("customers must be at least 1 (got 0)".into());
    }
    if cfg.days == 0 {
        return invalid("days must be at least 1 (got 0)".into());
    }
    if !cfg.bad_ratio.is_finite() || !(0.0..=1.0).contains(&cfg.bad_ratio) {
        return invalid(format!(
            "bad_ratio must be a finite number between 0 and 1 (got {})",
            cfg.bad_ratio
        ));
    }
    // Consumers reject pre-2000 times (that is one of the bad kinds), so good lines must
    // not fall there.
    let y2k = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).single();
    if y2k.is_some_and(|y2k| cfg.start < y2k) {
        return invalid(format!(
            "start must not be before 2000-01-01T00:00:00Z (got {})",
            cfg.start.to_rfc3339()
        ));
    }
    // Far-future bad lines sit 10 years after the period; keep them in 4-digit years so
    // they stay valid RFC 3339 and fail only on range.
    let last_far_future = TimeDelta::try_days(i64::from(cfg.days))
        .and_then(|span| cfg.start.checked_add_signed(span))
        .and_then(|end| end.checked_add_months(Months::new(120)));
    let limit = Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).single();
    match (last_far_future, limit) {
        (Some(last), Some(limit)) if last < limit => {}
        _ => {
            return invalid(format!(
                "start + days + 10 years must stay before year 10000 (start {}, days {})",
                cfg.start.to_rfc3339(),
                cfg.days
            ));
        }
    }
    Ok(i64::from(cfg.days) * MICROS_PER_DAY)
}

/// Seeds a separate stream per concern so that, for example, changing `bad_ratio` only
/// swaps lines for bad ones instead of reshuffling the whole data set.
fn stream(seed: u64, purpose: u64) -> StdRng {
    StdRng::seed_from_u64(splitmix64(seed ^ splitmix64(purpose)))
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

struct Pending {
    /// Tie-breaker for equal times so heap order (and output) is deterministic.
    seq: u64,
    event: Event,
}

impl Pending {
    fn key(&self) -> (i64, u64) {
        (self.event.at_us, self.seq)
    }
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

/// Maps a fraction of the event budget to a time offset, following `DENSITY_PROFILE`.
struct Clock {
    days: i64,
    span_us: i64,
    /// Weight of hour slot `h` after the start of each day, i.e. of UTC hour
    /// `(start.hour() + h) % 24`.
    weights: [f64; 24],
    day_weight: f64,
}

impl Clock {
    fn new(start: DateTime<Utc>, days: u32, span_us: i64) -> Self {
        let first = start.hour() as usize;
        let weights: [f64; 24] = std::array::from_fn(|h| DENSITY_PROFILE[(first + h) % 24]);
        Self {
            days: i64::from(days),
            span_us,
            weights,
            day_weight: weights.iter().sum(),
        }
    }

    fn offset_at(&self, fraction: f64) -> i64 {
        let total = fraction.clamp(0.0, 1.0) * self.days as f64;
        let day = (total.floor() as i64).clamp(0, self.days - 1);
        let mut rest = (total - day as f64).clamp(0.0, 1.0) * self.day_weight;
        let mut hour = 23;
        for (h, &w) in self.weights.iter().enumerate() {
            if rest < w {
                hour = h;
                break;
            }
            rest -= w;
        }
        let within = (rest / self.weights[hour]).clamp(0.0, 1.0);
        let at = day * MICROS_PER_DAY
            + hour as i64 * MICROS_PER_HOUR
            + (within * MICROS_PER_HOUR as f64) as i64;
        at.clamp(0, self.span_us - 1)
    }
}

// ---------------------------------------------------------------------------------------
// World: who does what, when
// ---------------------------------------------------------------------------------------

struct World {
    start: DateTime<Utc>,
    customers: u32,
    seed: u64,
    span_us: i64,
    rng: StdRng,
    clock: Clock,
    /// Only customers who switched; everyone else is on their derived initial tariff.
    switched: HashMap<u32, Tariff>,
    next_session: u64,
}

/// Stable per-customer traits derived from a hash instead of stored, so memory does not
/// grow with `customers`.
#[derive(Debug, Clone, Copy)]
enum Trait {
    HouseholdSize = 1,
    PreferredChannel = 2,
    InitialTariff = 3,
    MeterChannel = 4,
}

impl World {
    fn new(cfg: &GenerateConfig, span_us: i64) -> Self {
        Self {
            start: cfg.start,
            customers: cfg.customers,
            seed: cfg.seed,
            span_us,
            rng: stream(cfg.seed, 1),
            clock: Clock::new(cfg.start, cfg.days, span_us),
            switched: HashMap::new(),
            // Meter readings use the customer number as their session id, so interactive
            // sessions start above it and the two never collide.
            next_session: u64::from(cfg.customers) + 1,
        }
    }

    fn next_activity(&mut self, at: i64, budget: u64) -> Vec<Event> {
        if budget < 2 || self.rng.random_bool(METER_READING_SHARE) {
            vec![self.meter_reading(at)]
        } else {
            self.session(at, budget)
        }
    }

    fn customer_trait(&self, customer: u32, which: Trait) -> f64 {
        let h = splitmix64(self.seed ^ splitmix64((u64::from(customer) << 8) | which as u64));
        (h >> 11) as f64 / (1u64 << 53) as f64
    }

    fn current_tariff(&self, customer: u32) -> Tariff {
        match self.switched.get(&customer) {
            Some(&tariff) => tariff,
            None => pick(
                self.customer_trait(customer, Trait::InitialTariff),
                &TARIFF_MIX,
            ),
        }
    }

    fn meter_reading(&mut self, at: i64) -> Event {
        // Meters report for every customer alike, unlike app activity.
        let customer = self.rng.random_range(0..self.customers);
        let channel = if self.customer_trait(customer, Trait::MeterChannel) < 0.6 {
            Channel::MobileApp
        } else {
            Channel::WebPortal
        };
        let hour = (self.start + TimeDelta::microseconds(at)).hour() as usize;
        let energy = self.energy_kwh(customer, hour);
        Event {
            at_us: at,
            kind: EventType::EnergyConsumed,
            customer,
            session: u64::from(customer) + 1,
            channel,
            tariff: None,
            energy_kwh: Some(energy),
            amount_eur: None,
        }
    }

    fn energy_kwh(&mut self, customer: u32, hour: usize) -> f64 {
        // Zero readings happen (vacant homes, solar covering the load) and are valid.
        if self.rng.random_bool(0.005) {
            return 0.0;
        }
        let size = self.customer_trait(customer, Trait::HouseholdSize);
        let household = 0.4 + 2.0 * size * size;
        let noise = (0.25 * std_normal(&mut self.rng)).exp();
        round_to(MEAN_HOURLY_KWH * LOAD_PROFILE[hour] * household * noise, 3)
    }

    fn session(&mut self, at: i64, budget: u64) -> Vec<Event> {
        // A skewed pick makes a minority of customers account for much of the app traffic.
        let u: f64 = self.rng.random();
        let customer = ((u.powf(1.6) * f64::from(self.customers)) as u32).min(self.customers - 1);
        let preferred = pick(
            self.customer_trait(customer, Trait::PreferredChannel),
            &CHANNEL_MIX,
        );
        let channel = if self.rng.random_bool(0.7) {
            preferred
        } else {
            pick(self.rng.random(), &CHANNEL_MIX)
        };
        let session = self.next_session;
        self.next_session += 1;
        let mut tariff = self.current_tariff(customer);

        let mut steps: Vec<(EventType, Option<Tariff>, Option<f64>)> = Vec::new();
        let views = pick(
            self.rng.random(),
            &[(0usize, 0.25), (1, 0.40), (2, 0.25), (3, 0.10)],
        );
        for _ in 0..views {
            let viewed = pick(self.rng.random(), &TARIFF_MIX);
            steps.push((EventType::ViewTariffs, Some(viewed), None));
        }
        let switch_chance = if views > 0 { 0.15 } else { 0.03 };
        if self.rng.random_bool(switch_chance) {
            let target = self.switch_target(tariff);
            let revenue = self
                .rng
                .random_bool(0.9)
                .then(|| self.switch_revenue(target));
            steps.push((EventType::TariffSwitch, Some(target), revenue));
            tariff = target;
        }
        if self.rng.random_bool(0.30) {
            let amount = self.bill_amount();
            steps.push((EventType::BillPayment, None, Some(amount)));
        }
        if self.rng.random_bool(0.10) {
            let payout = self
                .rng
                .random_bool(0.9)
                .then(|| self.incentive_payout(tariff));
            steps.push((EventType::IncentiveClaim, Some(tariff), payout));
        }
        // Near the end of the budget keep login/logout and drop the tail of the middle,
        // so every session is still well-formed.
        steps.truncate(usize::try_from(budget - 2).unwrap_or(usize::MAX));
        if let Some(&(_, Some(target), _)) = steps
            .iter()
            .find(|(kind, _, _)| *kind == EventType::TariffSwitch)
        {
            self.switched.insert(customer, target);
        }

        // Phone calls take longer between steps than clicks do.
        let pace = if channel == Channel::CallCenter { 3 } else { 1 };
        let mut offsets = Vec::with_capacity(steps.len());
        let mut elapsed = 0i64;
        let mut gap_before = |rng: &mut StdRng, kind: EventType| {
            let (lo, hi) = match kind {
                EventType::ViewTariffs => (8, 90),
                EventType::TariffSwitch => (30, 240),
                EventType::BillPayment => (20, 180),
                EventType::IncentiveClaim => (15, 120),
                _ => (3, 60),
            };
            elapsed += pace * rng.random_range(lo * MICROS_PER_SECOND..hi * MICROS_PER_SECOND);
            elapsed
        };
        for (kind, _, _) in &steps {
            offsets.push(gap_before(&mut self.rng, *kind));
        }
        let duration = gap_before(&mut self.rng, EventType::UserLogout);
        // Sessions are far shorter than a day, so pulling one back to end inside the
        // period never pushes it before the start.
        let begin = at.min(self.span_us - 1 - duration).max(0);

        let base = Event {
            at_us: begin,
            kind: EventType::UserLogin,
            customer,
            session,
            channel,
            tariff: None,
            energy_kwh: None,
            amount_eur: None,
        };
        let mut events = Vec::with_capacity(steps.len() + 2);
        events.push(base.clone());
        for ((kind, tariff, amount), offset) in steps.into_iter().zip(offsets) {
            events.push(Event {
                at_us: begin + offset,
                kind,
                tariff,
                amount_eur: amount,
                ..base.clone()
            });
        }
        events.push(Event {
            at_us: begin + duration,
            kind: EventType::UserLogout,
            ..base
        });
        events
    }

    fn switch_target(&mut self, current: Tariff) -> Tariff {
        let options: Vec<(Tariff, f64)> = SWITCH_TARGET_PULL
            .iter()
            .copied()
            .filter(|(tariff, _)| *tariff != current)
            .collect();
        pick(self.rng.random(), &options)
    }

    fn switch_revenue(&mut self, target: Tariff) -> f64 {
        let eur = match target {
            Tariff::Basic => self.rng.random_range(0.0..15.0),
            Tariff::Green => self.rng.random_range(20.0..60.0),
            Tariff::Premium => self.rng.random_range(40.0..120.0),
        };
        round_to(eur, 2)
    }

    fn incentive_payout(&mut self, tariff: Tariff) -> f64 {
        let boost = if tariff == Tariff::Green { 1.5 } else { 1.0 };
        round_to(boost * self.rng.random_range(5.0..50.0), 2)
    }

    fn bill_amount(&mut self) -> f64 {
        let eur = 85.0 * (0.45 * std_normal(&mut self.rng)).exp();
        round_to(eur.clamp(8.0, 650.0), 2)
    }
}

/// Picks by cumulative weight; `u` in `[0, 1)`. Weights need not sum to 1.
fn pick<T: Copy>(u: f64, options: &[(T, f64)]) -> T {
    let total: f64 = options.iter().map(|(_, w)| w).sum();
    let mut rest = u * total;
    for &(value, weight) in options {
        if rest < weight {
            return value;
        }
        rest -= weight;
    }
    options[options.len() - 1].0
}

fn std_normal(rng: &mut StdRng) -> f64 {
    // Box-Muller; `1 - u` keeps the logarithm's argument in (0, 1].
    let u1 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn round_to(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

// ---------------------------------------------------------------------------------------
// Rendering and emission
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum TimeStyle {
    Utc,
    /// No offset at all; consumers read it as UTC.
    Naive,
    /// Same instant shown in another offset (seconds east of UTC).
    Offset(i32),
}

/// The accepted-but-unusual spellings a good line may use.
#[derive(Debug, Clone, Copy)]
struct Style {
    time: TimeStyle,
    session_as_text: bool,
    energy_as_text: bool,
    amount_as_text: bool,
}

impl Style {
    fn pick(rng: &mut StdRng) -> Self {
        let r: f64 = rng.random();
        let time = if r < 0.05 {
            TimeStyle::Naive
        } else if r < 0.07 {
            TimeStyle::Offset(OFFSETS[rng.random_range(0..OFFSETS.len())])
        } else {
            TimeStyle::Utc
        };
        Self {
            time,
            session_as_text: rng.random_bool(0.02),
            energy_as_text: rng.random_bool(0.02),
            amount_as_text: rng.random_bool(0.02),
        }
    }
}

fn format_time(at: DateTime<Utc>, style: TimeStyle) -> String {
    match style {
        TimeStyle::Naive => at.format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
        TimeStyle::Offset(secs) => match FixedOffset::east_opt(secs) {
            Some(tz) => at
                .with_timezone(&tz)
                .format("%Y-%m-%dT%H:%M:%S%.6f%:z")
                .to_string(),
            None => format_time(at, TimeStyle::Utc),
        },
        TimeStyle::Utc => at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
    }
}

fn number(value: f64, decimals: i32, as_text: bool) -> Value {
    if as_text {
        Value::String(format!("{:.*}", decimals as usize, value))
    } else {
        Value::from(round_to(value, decimals))
    }
}

/// Wire shape of a line. A struct rather than a `Value` tree so keys come out in the
/// documented order whatever `serde_json` features other crates switch on; every field is
/// optional only so that bad lines can drop one.
#[derive(Debug, Serialize)]
struct Wire {
    #[serde(skip_serializing_if = "Option::is_none")]
    event_type: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_time: Option<Value>,
    payload: WirePayload,
}

#[derive(Debug, Serialize)]
struct WirePayload {
    #[serde(skip_serializing_if = "Option::is_none")]
    customer_id: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tariff_type: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    energy_consumed: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payment_amount: Option<Value>,
}

#[derive(Debug, Clone, Copy)]
enum Field {
    EventType,
    EventTime,
    CustomerId,
    SessionId,
    Channel,
    TariffType,
    EnergyConsumed,
    PaymentAmount,
}

impl Wire {
    fn slot(&mut self, field: Field) -> &mut Option<Value> {
        match field {
            Field::EventType => &mut self.event_type,
            Field::EventTime => &mut self.event_time,
            Field::CustomerId => &mut self.payload.customer_id,
            Field::SessionId => &mut self.payload.session_id,
            Field::Channel => &mut self.payload.channel,
            Field::TariffType => &mut self.payload.tariff_type,
            Field::EnergyConsumed => &mut self.payload.energy_consumed,
            Field::PaymentAmount => &mut self.payload.payment_amount,
        }
    }
}

fn render(event: &Event, style: &Style, start: DateTime<Utc>) -> Wire {
    let session_id = if style.session_as_text {
        Value::String(event.session.to_string())
    } else {
        Value::from(event.session)
    };
    let at = start + TimeDelta::microseconds(event.at_us);
    Wire {
        event_type: Some(event.kind.as_str().into()),
        event_time: Some(format_time(at, style.time).into()),
        payload: WirePayload {
            customer_id: Some(customer_id(event.customer).into()),
            session_id: Some(session_id),
            channel: Some(event.channel.as_str().into()),
            tariff_type: event.tariff.map(|t| t.as_str().into()),
            energy_consumed: event
                .energy_kwh
                .map(|kwh| number(kwh, 3, style.energy_as_text)),
            payment_amount: event
                .amount_eur
                .map(|eur| number(eur, 2, style.amount_as_text)),
        },
    }
}

enum Line {
    Object(Wire),
    /// The object wrapped in a one-element array.
    Array(Wire),
    Scalar(Value),
    Raw(String),
    Bytes(Vec<u8>),
}

struct Emitter<W: Write> {
    out: BufWriter<W>,
    start: DateTime<Utc>,
    style_rng: StdRng,
    fault_rng: StdRng,
    lines_left: u64,
    bad_left: u64,
    /// Reshuffled every `ALL.len()` bad lines.
    deck: [BadKind; BadKind::ALL.len()],
    report: Report,
}

impl<W: Write> Emitter<W> {
    fn new(cfg: &GenerateConfig, out: W) -> Self {
        let bad = ((cfg.events as f64 * cfg.bad_ratio).round() as u64).min(cfg.events);
        Self {
            out: BufWriter::new(out),
            start: cfg.start,
            style_rng: stream(cfg.seed, 2),
            fault_rng: stream(cfg.seed, 3),
            lines_left: cfg.events,
            bad_left: bad,
            deck: BadKind::ALL,
            report: Report {
                summary: GenerateSummary::default(),
                bad_by_kind: [0; BadKind::ALL.len()],
            },
        }
    }

    fn emit(&mut self, event: &Event) -> Result<(), GenerateError> {
        // Drawn for every line, bad or not, so good lines keep their spelling whatever
        // `bad_ratio` is.
        let style = Style::pick(&mut self.style_rng);
        // Selection sampling: exactly `bad_left` of the remaining lines turn bad.
        let make_bad =
            self.bad_left > 0 && self.fault_rng.random_range(0..self.lines_left) < self.bad_left;
        self.lines_left = self.lines_left.saturating_sub(1);
        let line = if make_bad {
            let kind = self.next_bad_kind();
            self.bad_left -= 1;
            // `ALL` lists the kinds in declaration order, so the discriminant is the index.
            self.report.bad_by_kind[kind as usize] += 1;
            self.report.summary.bad += 1;
            bad_line(kind, event, &style, self.start, &mut self.fault_rng)
        } else {
            self.report.summary.good += 1;
            Line::Object(render(event, &style, self.start))
        };
        let written = match line {
            Line::Object(wire) => serde_json::to_writer(&mut self.out, &wire),
            Line::Array(wire) => serde_json::to_writer(&mut self.out, &[wire]),
            Line::Scalar(value) => serde_json::to_writer(&mut self.out, &value),
            Line::Raw(text) => {
                self.out.write_all(text.as_bytes())?;
                Ok(())
            }
            Line::Bytes(bytes) => {
                self.out.write_all(&bytes)?;
                Ok(())
            }
        };
        written.map_err(std::io::Error::from)?;
        self.out.write_all(b"\n")?;
        Ok(())
    }

    fn next_bad_kind(&mut self) -> BadKind {
        let position = (self.report.summary.bad % self.deck.len() as u64) as usize;
        if position == 0 {
            self.deck.shuffle(&mut self.fault_rng);
        }
        self.deck[position]
    }

    fn finish(mut self) -> Result<Report, GenerateError> {
        self.out.flush()?;
        Ok(self.report)
    }
}

/// Turns `event` into another event type (with plausible fields) when a bad kind needs a
/// specific type to be meaningful, e.g. "bill_payment without payment_amount".
fn coerce(event: &Event, kind: EventType, rng: &mut StdRng) -> Event {
    if event.kind == kind {
        return event.clone();
    }
    Event {
        kind,
        tariff: kind
            .carries_tariff()
            .then(|| pick(rng.random(), &TARIFF_MIX)),
        energy_kwh: (kind == EventType::EnergyConsumed)
            .then(|| round_to(rng.random_range(0.05..2.0), 3)),
        amount_eur: (kind == EventType::BillPayment)
            .then(|| round_to(rng.random_range(20.0..200.0), 2)),
        ..event.clone()
    }
}

fn choose<T: Copy>(rng: &mut StdRng, options: &[T]) -> T {
    options[rng.random_range(0..options.len())]
}

/// The year of the far-future bad lines.
const FAR_FUTURE_YEAR: i32 = 9996;

fn bad_line(
    kind: BadKind,
    event: &Event,
    style: &Style,
    start: DateTime<Utc>,
    rng: &mut StdRng,
) -> Line {
    let same = || event.clone();
    // The event to render, then which field to overwrite (`None` removes it).
    let (base, edit): (Event, Option<(Field, Option<Value>)>) = match kind {
        BadKind::MalformedJson => {
            let text = serde_json::to_string(&render(event, style, start))
                .unwrap_or_else(|_| "{}".to_string());
            // Any proper prefix of an object is invalid JSON; cutting in the second half
            // keeps the line looking like an event.
            let mut cut = rng.random_range(text.len() / 2..text.len());
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            return Line::Raw(text[..cut].to_string());
        }
        BadKind::JsonArray => return Line::Array(render(event, style, start)),
        BadKind::NotUtf8 => {
            let mut bytes = serde_json::to_vec(&render(event, style, start)).unwrap_or_default();
            let key = b"\"customer_id\":\"";
            let at = bytes
                .windows(key.len())
                .position(|w| w == key)
                .map_or(bytes.len() / 2, |i| i + key.len());
            // 0xFF never occurs in UTF-8.
            bytes.insert(at, 0xFF);
            return Line::Bytes(bytes);
        }
        BadKind::EmptyLine => return Line::Raw(String::new()),
        BadKind::JsonScalar => {
            return Line::Scalar(if rng.random_bool(0.5) {
                Value::from(rng.random_range(0..10_000u32))
            } else {
                Value::from(event.kind.as_str())
            });
        }
        BadKind::MissingEventType => (same(), Some((Field::EventType, None))),
        BadKind::UnknownEventType => {
            let name = choose(rng, &["meter_exploded", "solar_flare", "tariff_teleport"]);
            (same(), Some((Field::EventType, Some(name.into()))))
        }
        BadKind::MissingEventTime => (same(), Some((Field::EventTime, None))),
        BadKind::UnparseableEventTime => {
            let text = choose(rng, &["yesterday", "12:34:56", "2025-13-45T25:61:00Z"]);
            (same(), Some((Field::EventTime, Some(text.into()))))
        }
        BadKind::EventTimeBefore2000 => {
            let text = choose(
                rng,
                &["1999-12-31T23:59:59Z", "1970-01-01T00:00:00.000000Z"],
            );
            (same(), Some((Field::EventTime, Some(text.into()))))
        }
        BadKind::EventTimeFarFuture => {
            let at = start + TimeDelta::microseconds(event.at_us);
            // A far year, not a span after the period: ten years after an
            // old `--start` is in the past, and such a line was valid. 9996
            // is a leap year, so every date moves there.
            let text = at.with_year(FAR_FUTURE_YEAR).map_or_else(
                || format!("{FAR_FUTURE_YEAR}-12-31T23:59:59Z"),
                |t| format_time(t, TimeStyle::Utc),
            );
            (same(), Some((Field::EventTime, Some(text.into()))))
        }
        BadKind::MissingCustomerId => (same(), Some((Field::CustomerId, None))),
        BadKind::MissingSessionId => (same(), Some((Field::SessionId, None))),
        BadKind::MissingChannel => (same(), Some((Field::Channel, None))),
        BadKind::MissingTariffType => {
            let kind = if event.kind.carries_tariff() {
                event.kind
            } else {
                choose(
                    rng,
                    &[
                        EventType::ViewTariffs,
                        EventType::TariffSwitch,
                        EventType::IncentiveClaim,
                    ],
                )
            };
            (coerce(event, kind, rng), Some((Field::TariffType, None)))
        }
        BadKind::MissingEnergy => (
            coerce(event, EventType::EnergyConsumed, rng),
            Some((Field::EnergyConsumed, None)),
        ),
        BadKind::MissingPaymentAmount => (
            coerce(event, EventType::BillPayment, rng),
            Some((Field::PaymentAmount, None)),
        ),
        BadKind::NegativeNumber => {
            let (mut base, _) = numeric_target(event, rng);
            // Keep the magnitude away from zero: rounding to -0.0 would not be negative.
            if let Some(kwh) = base.energy_kwh.as_mut() {
                *kwh = -kwh.max(0.001);
            }
            if let Some(eur) = base.amount_eur.as_mut() {
                *eur = -eur.max(0.01);
            }
            (base, None)
        }
        BadKind::NonNumericString | BadKind::NonFiniteString => {
            let (base, field) = numeric_target(event, rng);
            let texts = if kind == BadKind::NonNumericString {
                ["abc", "n/a", "twelve"]
            } else {
                ["NaN", "Infinity", "-Infinity"]
            };
            (base, Some((field, Some(choose(rng, &texts).into()))))
        }
        BadKind::EmptyCustomerId => (same(), Some((Field::CustomerId, Some("".into())))),
        BadKind::NonIntegerSessionId => {
            let text = format!("s-{}", event.session);
            (same(), Some((Field::SessionId, Some(text.into()))))
        }
    };
    let mut wire = render(&base, style, start);
    if let Some((field, value)) = edit {
        *wire.slot(field) = value;
    }
    Line::Object(wire)
}

/// An energy reading or a bill payment: the two events whose number is mandatory, so a
/// broken number cannot be mistaken for an absent optional one.
fn numeric_target(event: &Event, rng: &mut StdRng) -> (Event, Field) {
    if rng.random_bool(0.5) {
        (
            coerce(event, EventType::EnergyConsumed, rng),
            Field::EnergyConsumed,
        )
    } else {
        (
            coerce(event, EventType::BillPayment, rng),
            Field::PaymentAmount,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDateTime;
    use serde_json::Map;
    use std::collections::BTreeMap;

    fn cfg(events: u64, bad_ratio: f64) -> GenerateConfig {
        GenerateConfig {
            events,
            bad_ratio,
            ..GenerateConfig::default()
        }
    }

    fn output_bytes(cfg: &GenerateConfig) -> (Report, Vec<u8>) {
        let mut buf = Vec::new();
        let report = run(cfg, &mut buf).expect("generation succeeds");
        (report, buf)
    }

    /// The output as text; a line that is not UTF-8 (one bad kind) becomes
    /// a line no JSON reader takes.
    fn output(cfg: &GenerateConfig) -> (Report, String) {
        let (report, buf) = output_bytes(cfg);
        if buf.is_empty() {
            return (report, String::new());
        }
        let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let lines: Vec<String> = body
            .split(|&b| b == b'\n')
            .map(|l| match std::str::from_utf8(l) {
                Ok(text) => text.to_string(),
                Err(_) => "<not UTF-8>".to_string(),
            })
            .collect();
        (report, lines.join("\n") + "\n")
    }

    /// A good line, as an independent consumer would accept it.
    struct Accepted {
        event_type: String,
        time: DateTime<Utc>,
        raw_time: String,
        payload: Map<String, Value>,
    }

    fn parse_time(text: &str) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(text)
            .map(|t| t.with_timezone(&Utc))
            .ok()
            .or_else(|| {
                NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
                    .ok()
                    .map(|t| t.and_utc())
            })
    }

    fn amount(value: &Value) -> Result<f64, String> {
        let x = match value {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.parse::<f64>().ok(),
            _ => None,
        }
        .ok_or_else(|| format!("not a number: {value}"))?;
        if !x.is_finite() || x < 0.0 {
            return Err(format!("not a finite non-negative number: {value}"));
        }
        Ok(x)
    }

    fn accept(line: &str, cfg: &GenerateConfig) -> Result<Accepted, String> {
        let value: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let root = value.as_object().ok_or("not an object")?;
        let event_type = root
            .get("event_type")
            .and_then(Value::as_str)
            .ok_or("no event_type")?;
        let known = [
            "user_login",
            "user_logout",
            "view_tariffs",
            "tariff_switch",
            "energy_consumed",
            "incentive_claim",
            "bill_payment",
        ];
        if !known.contains(&event_type) {
            return Err(format!("unknown event_type {event_type}"));
        }
        let raw_time = root
            .get("event_time")
            .and_then(Value::as_str)
            .ok_or("no event_time")?;
        let time = parse_time(raw_time).ok_or("unparseable event_time")?;
        let end = cfg.start + TimeDelta::days(i64::from(cfg.days));
        if time < cfg.start || time >= end {
            return Err(format!("event_time {raw_time} outside the period"));
        }
        let payload = root
            .get("payload")
            .and_then(Value::as_object)
            .ok_or("no payload object")?;
        match payload.get("customer_id").and_then(Value::as_str) {
            Some(id) if !id.is_empty() => {}
            _ => return Err("bad customer_id".into()),
        }
        match payload.get("session_id") {
            Some(Value::Number(n)) if n.is_u64() => {}
            Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {}
            _ => return Err("bad session_id".into()),
        }
        match payload.get("channel").and_then(Value::as_str) {
            Some("web_portal" | "mobile_app" | "call_center") => {}
            _ => return Err("bad channel".into()),
        }
        if matches!(
            event_type,
            "view_tariffs" | "tariff_switch" | "incentive_claim"
        ) {
            match payload.get("tariff_type").and_then(Value::as_str) {
                Some("basic" | "green" | "premium") => {}
                _ => return Err("bad tariff_type".into()),
            }
        }
        match payload.get("energy_consumed") {
            Some(v) => {
                amount(v)?;
            }
            None if event_type == "energy_consumed" => return Err("no energy_consumed".into()),
            None => {}
        }
        match payload.get("payment_amount") {
            Some(v) => {
                amount(v)?;
            }
            None if event_type == "bill_payment" => return Err("no payment_amount".into()),
            None => {}
        }
        Ok(Accepted {
            event_type: event_type.to_string(),
            time,
            raw_time: raw_time.to_string(),
            payload: payload.clone(),
        })
    }

    #[test]
    fn same_config_same_bytes_other_seed_other_bytes() {
        let a = cfg(3_000, 0.1);
        let (_, first) = output(&a);
        let (_, second) = output(&a);
        assert_eq!(first, second);
        let (_, other) = output(&GenerateConfig { seed: 43, ..a });
        assert_ne!(first, other);
    }

    #[test]
    fn writes_exactly_the_requested_lines_all_valid() {
        for events in [0, 1, 2, 3, 7, 5_000] {
            let c = GenerateConfig {
                events,
                customers: if events < 10 { 1 } else { 200 },
                days: if events < 10 { 1 } else { 7 },
                ..GenerateConfig::default()
            };
            let (report, text) = output(&c);
            assert_eq!(text.lines().count() as u64, events);
            assert_eq!(
                report.summary,
                GenerateSummary {
                    good: events,
                    bad: 0
                }
            );
            if let Some(first) = text.lines().next() {
                assert!(first.starts_with(r#"{"event_type":""#), "{first}");
            }
            for line in text.lines() {
                if let Err(why) = accept(line, &c) {
                    panic!("{why}: {line}");
                }
            }
        }
    }

    #[test]
    fn every_bad_kind_appears_and_counts_match() {
        let c = cfg(2_000, 0.3);
        let (report, text) = output(&c);
        assert_eq!(text.lines().count(), 2_000);
        assert_eq!(
            report.summary,
            GenerateSummary {
                good: 1_400,
                bad: 600
            }
        );
        for (kind, count) in BadKind::ALL.iter().zip(report.bad_by_kind) {
            assert!(count > 0, "{kind:?} never generated");
        }
        assert_eq!(report.bad_by_kind.iter().sum::<u64>(), 600);
        let rejected = text.lines().filter(|l| accept(l, &c).is_err()).count();
        assert_eq!(rejected, 600, "every bad line, and only those, is rejected");
    }

    /// Regression: far-future bad lines were dated ten years after the
    /// period, so with an old `--start` they lay in the past and the
    /// pipeline stored them, while `generate` counted them invalid.
    #[test]
    fn every_bad_line_is_rejected_by_the_pipeline_whatever_the_start() {
        for start in [
            Utc.with_ymd_and_hms(2005, 1, 1, 0, 0, 0).unwrap(),
            Utc::now() - TimeDelta::days(3),
        ] {
            let c = GenerateConfig {
                events: 500,
                bad_ratio: 1.0,
                start,
                ..GenerateConfig::default()
            };
            let (_, bytes) = output_bytes(&c);
            let lines: Vec<&[u8]> = bytes
                .strip_suffix(b"\n")
                .unwrap()
                .split(|&b| b == b'\n')
                .collect();
            let meta = crate::decode::MessageMeta {
                partition: 0,
                offset: 0,
                timestamp_ms: None,
            };
            let batch = crate::decode::decode_batch(
                crate::decode::DecodeConfig::default(),
                lines.iter().map(|l| (Some(*l), meta)),
            );
            let out = crate::validate::validate(
                &batch,
                &crate::validate::ValidationRules::default(),
                Utc::now(),
            )
            .unwrap();
            assert_eq!(out.valid.num_rows(), 0, "start {start}");
            assert_eq!(out.rejects.num_rows(), 500, "start {start}");
        }
    }

    #[test]
    fn bad_ratio_only_replaces_lines() {
        let (_, clean) = output(&cfg(1_500, 0.0));
        let c = cfg(1_500, 0.2);
        let (report, salted) = output(&c);
        let mut replaced = 0;
        for (a, b) in clean.lines().zip(salted.lines()) {
            if a != b {
                replaced += 1;
                assert!(accept(b, &c).is_err(), "replacement is valid: {b}");
            }
        }
        assert_eq!(replaced, report.summary.bad);
        let (all_bad, _) = output(&cfg(100, 1.0));
        assert_eq!(all_bad.summary, GenerateSummary { good: 0, bad: 100 });
    }

    #[test]
    fn distributions_look_like_an_energy_retailer() {
        let c = cfg(20_000, 0.0);
        let (_, text) = output(&c);
        let mut types: BTreeMap<String, u64> = BTreeMap::new();
        let mut channels: BTreeMap<String, u64> = BTreeMap::new();
        let mut tariffs: BTreeMap<String, u64> = BTreeMap::new();
        let (mut naive, mut offset, mut text_numbers) = (0, 0, 0);
        let mut energy_by_hour = [(0.0f64, 0u64); 24];
        let mut events_by_hour = [0u64; 24];
        for line in text.lines() {
            let ev = accept(line, &c).unwrap_or_else(|why| panic!("{why}: {line}"));
            *types.entry(ev.event_type.clone()).or_default() += 1;
            let field = |k: &str| {
                ev.payload
                    .get(k)
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            *channels
                .entry(field("channel").unwrap_or_default())
                .or_default() += 1;
            if let Some(t) = field("tariff_type") {
                *tariffs.entry(t).or_default() += 1;
            }
            if !ev.raw_time.ends_with('Z') {
                if ev.raw_time.contains('+') || ev.raw_time.rfind('-') > Some(10) {
                    offset += 1;
                } else {
                    naive += 1;
                }
            }
            if ev.payload.values().any(|v| {
                v.as_str()
                    .is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
            }) {
                text_numbers += 1;
            }
            let hour = ev.time.hour() as usize;
            events_by_hour[hour] += 1;
            if let Some(kwh) = ev.payload.get("energy_consumed") {
                let slot = &mut energy_by_hour[hour];
                slot.0 += amount(kwh).expect("checked by accept");
                slot.1 += 1;
            }
        }
        assert_eq!(types.len(), 7, "{types:?}");
        assert_eq!(channels.len(), 3, "{channels:?}");
        assert_eq!(tariffs.len(), 3, "{tariffs:?}");
        assert!(channels["web_portal"] > channels["call_center"]);
        assert!(naive > 0 && offset > 0 && text_numbers > 0);

        let mean = |hours: &[usize]| {
            let (sum, n) = hours.iter().fold((0.0, 0), |(s, n), &h| {
                (s + energy_by_hour[h].0, n + energy_by_hour[h].1)
            });
            assert!(n > 0, "no readings in hours {hours:?}");
            sum / n as f64
        };
        let evening = mean(&[18, 19, 20]);
        let night = mean(&[3]);
        assert!(evening > 2.0 * night, "evening {evening} vs 03:00 {night}");
        assert!(
            events_by_hour[19] > 3 * events_by_hour[3],
            "{events_by_hour:?}"
        );

        // Sessions open with a login and close with a logout on one channel.
        let mut sessions: HashMap<String, Vec<(DateTime<Utc>, String, String)>> = HashMap::new();
        for line in text.lines() {
            let ev = accept(line, &c).expect("checked above");
            if ev.event_type != "energy_consumed" {
                let id = ev.payload["session_id"].to_string().replace('"', "");
                let channel = ev.payload["channel"].to_string();
                sessions
                    .entry(id)
                    .or_default()
                    .push((ev.time, ev.event_type, channel));
            }
        }
        for (id, mut steps) in sessions {
            steps.sort();
            assert_eq!(steps[0].1, "user_login", "session {id}");
            assert_eq!(steps[steps.len() - 1].1, "user_logout", "session {id}");
            assert!(steps.iter().all(|s| s.2 == steps[0].2), "session {id}");
        }
    }

    #[test]
    fn bad_kinds_are_listed_in_declaration_order() {
        for (index, kind) in BadKind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, index, "{kind:?}");
        }
    }

    #[test]
    fn rejects_invalid_settings() {
        let bad = [
            GenerateConfig {
                customers: 0,
                ..GenerateConfig::default()
            },
            GenerateConfig {
                days: 0,
                ..GenerateConfig::default()
            },
            GenerateConfig {
                bad_ratio: -0.1,
                ..GenerateConfig::default()
            },
            GenerateConfig {
                bad_ratio: 1.5,
                ..GenerateConfig::default()
            },
            GenerateConfig {
                bad_ratio: f64::NAN,
                ..GenerateConfig::default()
            },
            GenerateConfig {
                days: u32::MAX,
                ..GenerateConfig::default()
            },
            GenerateConfig {
                start: Utc.with_ymd_and_hms(1999, 6, 1, 0, 0, 0).unwrap(),
                ..GenerateConfig::default()
            },
        ];
        for c in bad {
            match generate(&c, Vec::new()) {
                Err(GenerateError::InvalidConfig(msg)) => assert!(!msg.is_empty()),
                other => panic!("{c:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn reports_write_failures() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk full"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        assert!(matches!(
            generate(&cfg(100, 0.0), Broken),
            Err(GenerateError::Io(_))
        ));
    }
}
