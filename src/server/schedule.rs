//! When a deployment starts by itself: once (`--at 02:00`) or again and
//! again (`--at 02:00 --every weekday`), in the server's time zone.
//!
//! A schedule keeps the civil time the admin typed and its time zone, and
//! works out each fire from them, so that DST is handled one way throughout:
//! a time that does not exist on a spring-forward day fires as much later
//! as the clock jumped (02:30 becomes 03:30), and a time that exists twice on
//! a fall-back day fires once, at the first of the two. The first fire also
//! keeps its UTC offset, so `--at +30m` typed in the repeated hour means the
//! hour the admin meant.
//!
//! Whether anything is due is a pure function of the clock and of the last
//! fire the server dealt with ([`Schedule::due`]): a fire missed while the
//! server was down happens once late within [`GRACE`], and is skipped after.

use std::fmt;
use std::str::FromStr;

use anyhow::{Context, Result, anyhow, bail};
use jiff::civil::{Date, DateTime, Time, Weekday};
use jiff::fmt::temporal::Pieces;
use jiff::tz::{AmbiguousOffset, Offset, TimeZone};
use jiff::{SignedDuration, Span, Timestamp, ZonedDateTime};
use serde::{Deserialize, Serialize};

/// How late a fire may still happen, when the server was down (or busy) at
/// its time: a room woken an hour late may be in use, so later it is skipped.
pub const GRACE: SignedDuration = SignedDuration::from_mins(30);

/// Longest `--at` or `--every` accepted, and longest stored form.
const MAX_INPUT: usize = 64;
const MAX_STORED: usize = 200;

/// A deployment's start time, once or on some days of the week.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Schedule {
    /// The civil date and time of the first fire, as the admin meant it.
    start: DateTime,
    /// Resolves `start` to an instant: which of the two in a fall-back hour;
    /// in a spring-forward gap, the offset before it (so 02:30 is 03:30).
    offset: Offset,
    tz: TimeZone,
    /// `None`: once. Else the days on which `start`'s time fires, from
    /// `start`'s date on.
    days: Option<Days>,
}

/// What a scheduler should do now, from [`Schedule::due`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// Start now (late by at most [`GRACE`]); then record this fire as
    /// handled. Older missed fires are covered by it.
    Fire(Timestamp),
    /// This fire (and any before it) was missed by more than [`GRACE`]: say
    /// so, record it as handled, and ask again.
    Missed(Timestamp),
    /// Nothing to do before this instant. Sleep at most until then, and
    /// rather recheck now and then: the wall clock may jump.
    Wait(Timestamp),
    /// A one-time schedule that fired or was missed: nothing more, ever.
    Done,
}

impl Schedule {
    /// Parses what an admin typed: `at` is `HH:MM[:SS]` (the next such time,
    /// today or tomorrow), `YYYY-MM-DD HH:MM[:SS]` (also with a `T`), or
    /// `+DURATION` (`+30m`, `+2h`, `+1h30m`). `every` is `day`, `weekday`
    /// (Monday to Friday), `weekend`, or days and ranges such as
    /// `mon,wed,fri` or `mon-thu`; from `at`'s date on, each of those days
    /// fires at `at`'s time. Times are in `now`'s time zone, which must have
    /// a name (or be a fixed offset) to be stored.
    pub fn parse(at: &str, every: Option<&str>, now: &ZonedDateTime) -> Result<Schedule> {
        let tz = now.time_zone().clone();
        check_storable(&tz)?;
        let (start, offset) = parse_at(at, now).with_context(|| format!("--at {at:?}"))?;
        let days = every
            .map(|e| Days::parse(e).with_context(|| format!("--every {e:?}")))
            .transpose()?;
        Ok(Schedule {
            start,
            offset,
            tz,
            days,
        })
    }

    /// [`Schedule::parse`] at the present time in the system's time zone
    /// (`TZ` if set, else /etc/localtime).
    pub fn parse_now(at: &str, every: Option<&str>) -> Result<Schedule> {
        Self::parse(at, every, &ZonedDateTime::now())
    }

    pub fn time_zone(&self) -> &TimeZone {
        &self.tz
    }

    pub fn is_repeating(&self) -> bool {
        self.days.is_some()
    }

    /// The first fire strictly after `after`; `None` once a one-time
    /// schedule's fire is past (or beyond the calendar's range).
    pub fn next_fire(&self, after: Timestamp) -> Option<Timestamp> {
        let Some(days) = self.days else {
            return self.first().filter(|&t| t > after);
        };
        // The day before `after`'s local date too: a fire shifted over
        // midnight by a DST gap belongs to the day before.
        let local = after.to_zoned_datetime(self.tz.clone()).date();
        let mut d = local.yesterday().unwrap_or(local).max(self.start.date());
        // Seven days hold every weekday; two more for the shifted day.
        for _ in 0..9 {
            if days.contains(d.weekday())
                && let Some(t) = self.fire_on(d)
                && t > after
            {
                return Some(t);
            }
            d = d.tomorrow().ok()?;
        }
        None
    }

    /// The last fire at or before `at`, if any.
    pub fn last_fire(&self, at: Timestamp) -> Option<Timestamp> {
        let Some(days) = self.days else {
            return self.first().filter(|&t| t <= at);
        };
        let local = at.to_zoned_datetime(self.tz.clone()).date();
        let mut d = local.tomorrow().unwrap_or(local);
        for _ in 0..9 {
            if d < self.start.date() {
                return None;
            }
            if days.contains(d.weekday())
                && let Some(t) = self.fire_on(d)
                && t <= at
            {
                return Some(t);
            }
            d = d.yesterday().ok()?;
        }
        None
    }

    /// What to do at `now`, given the scheduled time of the last fire the
    /// caller fired or recorded as missed (`None`: none yet). Only the
    /// latest fire up to `now` counts, so a long outage never makes a burst;
    /// a clock set back never fires the same time twice.
    pub fn due(&self, handled: Option<Timestamp>, now: Timestamp) -> Due {
        if let Some(f) = self.last_fire(now)
            && handled.is_none_or(|h| f > h)
        {
            let floor = now.checked_sub(GRACE).unwrap_or(Timestamp::MIN);
            return if f >= floor {
                Due::Fire(f)
            } else {
                Due::Missed(f)
            };
        }
        let after = handled.map_or(now, |h| h.max(now));
        match self.next_fire(after) {
            Some(t) => Due::Wait(t),
            None => Due::Done,
        }
    }

    /// The first fire: `start` with its own offset when that is still one
    /// of the zone's for it (the rules may have changed since it was
    /// stored); else as any other day.
    fn first(&self) -> Option<Timestamp> {
        let amb = self.tz.to_ambiguous_timestamp(self.start);
        let valid = match amb.offset() {
            AmbiguousOffset::Unambiguous { offset } => offset == self.offset,
            AmbiguousOffset::Fold { before, after } => {
                before == self.offset || after == self.offset
            }
            AmbiguousOffset::Gap { .. } => false,
        };
        if valid {
            self.offset.to_timestamp(self.start).ok()
        } else {
            resolve(&self.tz, self.start).map(|(_, t)| t)
        }
    }

    /// The fire on day `d` (on or after `start`'s date): `start`'s time,
    /// moved on by a DST gap, the first of two in a fold.
    fn fire_on(&self, d: Date) -> Option<Timestamp> {
        if d == self.start.date() {
            return self.first();
        }
        resolve(&self.tz, d.to_datetime(self.start.time())).map(|(_, t)| t)
    }
}

/// `dt` in `tz` by jiff's "compatible" rule: in a gap, with the offset
/// before it (so 02:30 is 03:30); in a fold, the first of the two.
fn resolve(tz: &TimeZone, dt: DateTime) -> Option<(Offset, Timestamp)> {
    let offset = match tz.to_ambiguous_timestamp(dt).offset() {
        AmbiguousOffset::Unambiguous { offset }
        | AmbiguousOffset::Gap { before: offset, .. }
        | AmbiguousOffset::Fold { before: offset, .. } => offset,
    };
    Some((offset, offset.to_timestamp(dt).ok()?))
}

/// `+DURATION`, `YYYY-MM-DD HH:MM[:SS]` or `HH:MM[:SS]`, to the first
/// fire's civil time and the offset that makes it an instant.
fn parse_at(at: &str, now: &ZonedDateTime) -> Result<(DateTime, Offset)> {
    if at.len() > MAX_INPUT {
        bail!("too long");
    }
    let at = at.trim();
    let tz = now.time_zone();
    let now_ts = now.timestamp();
    if let Some(d) = at.strip_prefix('+') {
        let span: Span = d
            .parse()
            .map_err(|e| anyhow!("not a duration such as +30m or +2h ({e})"))?;
        if span.signum() <= 0 {
            bail!("the duration must be more than zero");
        }
        let t = now
            .checked_add(span)
            .map_err(|_| anyhow!("too far ahead"))?;
        // Whole seconds: a schedule is shown to people.
        let t = Timestamp::from_second(t.timestamp().as_second()).context("too far ahead")?;
        if t <= now_ts {
            bail!("the duration must be at least a second");
        }
        let t = t.to_zoned_datetime(tz.clone());
        return Ok((t.datetime(), t.offset()));
    }
    if let Some((date, time)) = at.split_once([' ', 'T']) {
        let dt = parse_date(date.trim())?.to_datetime(parse_time(time.trim())?);
        let (offset, t) = resolve(tz, dt).context("out of range")?;
        if t <= now_ts {
            bail!(
                "{dt} is in the past (now {})",
                now.strftime("%Y-%m-%d %H:%M %Z")
            );
        }
        return Ok((dt, offset));
    }
    let time = parse_time(at)?;
    let today = now.date();
    for d in [Some(today), today.tomorrow().ok()].into_iter().flatten() {
        let dt = d.to_datetime(time);
        if let Some((offset, t)) = resolve(tz, dt)
            && t > now_ts
        {
            return Ok((dt, offset));
        }
    }
    bail!("out of range")
}

/// `YYYY-MM-DD`, with errors naming the field.
fn parse_date(s: &str) -> Result<Date> {
    let parts: Vec<&str> = s.split('-').collect();
    let [y, m, d] = parts[..] else {
        bail!("the date must be YYYY-MM-DD, not {s:?}");
    };
    let y = number(y, "year", 4)?;
    let m = number(m, "month", 2)?;
    let d = number(d, "day", 2)?;
    if !(1970..=9999).contains(&y) {
        bail!("year must be 1970-9999");
    }
    if !(1..=12).contains(&m) {
        bail!("month must be 1-12");
    }
    let first = Date::new(y as i16, m as i8, 1)?;
    let len = first.days_in_month();
    if d < 1 || d > i64::from(len) {
        bail!("day must be 1-{len} in {y:04}-{m:02}");
    }
    Ok(Date::new(y as i16, m as i8, d as i8)?)
}

/// `HH:MM` or `HH:MM:SS`, with errors naming the field.
fn parse_time(s: &str) -> Result<Time> {
    let parts: Vec<&str> = s.split(':').collect();
    let (h, m, sec) = match parts[..] {
        [h, m] => (h, m, None),
        [h, m, sec] => (h, m, Some(sec)),
        _ => bail!("the time must be HH:MM or HH:MM:SS, not {s:?}"),
    };
    let h = number(h, "hour", 2)?;
    let m = number(m, "minute", 2)?;
    let sec = sec
        .map(|s| number(s, "second", 2))
        .transpose()?
        .unwrap_or(0);
    if h > 23 {
        bail!("hour must be 0-23");
    }
    if m > 59 {
        bail!("minute must be 0-59");
    }
    if sec > 59 {
        bail!("second must be 0-59");
    }
    Ok(Time::new(h as i8, m as i8, sec as i8, 0)?)
}

/// Up to `digits` decimal digits.
fn number(s: &str, what: &str, digits: usize) -> Result<i64> {
    if s.is_empty() || s.len() > digits || !s.bytes().all(|b| b.is_ascii_digit()) {
        bail!("{what} must be a number of at most {digits} digits, not {s:?}");
    }
    Ok(s.parse()?)
}

/// A set of weekdays; bit 0 is Monday.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Days(u8);

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const ALL: u8 = 0b111_1111;
const WEEKDAYS: u8 = 0b001_1111;
const WEEKEND: u8 = 0b110_0000;

impl Days {
    /// `day`, `weekday`, `weekend`, or names and ranges: `mon,wed-fri`.
    pub fn parse(s: &str) -> Result<Days> {
        if s.len() > MAX_INPUT {
            bail!("too long");
        }
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "day" | "daily" => return Ok(Days(ALL)),
            "weekday" | "weekdays" => return Ok(Days(WEEKDAYS)),
            "weekend" | "weekends" => return Ok(Days(WEEKEND)),
            _ => {}
        }
        let mut bits = 0u8;
        for item in s.split(',').map(str::trim) {
            match item.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (day_index(a)?, day_index(b)?);
                    // A range may wrap round the week: fri-mon.
                    let mut i = a;
                    loop {
                        bits |= 1 << i;
                        if i == b {
                            break;
                        }
                        i = (i + 1) % 7;
                    }
                }
                None => bits |= 1 << day_index(item)?,
            }
        }
        Ok(Days(bits))
    }

    pub fn contains(self, d: Weekday) -> bool {
        self.0 & (1 << d.to_monday_zero_offset()) != 0
    }
}

/// `mon`..`sun`, or the whole name.
fn day_index(s: &str) -> Result<u8> {
    const FULL: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    (0..7u8)
        .find(|&i| s == DAY_NAMES[i as usize] || s == FULL[i as usize])
        .with_context(|| {
            format!(
                "{s:?} is not a day (mon, tue, wed, thu, fri, sat, sun; or day, weekday, weekend)"
            )
        })
}

impl fmt::Display for Days {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            ALL => return f.write_str("day"),
            WEEKDAYS => return f.write_str("weekday"),
            WEEKEND => return f.write_str("weekend"),
            _ => {}
        }
        let names: Vec<&str> = (0..7)
            .filter(|i| self.0 & (1 << i) != 0)
            .map(|i| DAY_NAMES[i])
            .collect();
        f.write_str(&names.join(","))
    }
}

/// A zone is stored as its IANA name or as a fixed offset; one with neither
/// (a POSIX `TZ` rule, an unnamed file) could not be read back the same.
fn check_storable(tz: &TimeZone) -> Result<()> {
    if tz.iana_name().is_none() && tz.to_fixed_offset().is_err() {
        bail!("the server's time zone has no name: set TZ to one, such as TZ=Europe/Paris");
    }
    Ok(())
}

/// The stored form: `at 2026-12-24T02:00:00+01:00[Europe/Paris]`, then
/// ` every mon,wed` when it repeats. The offset picks the hour in a fold.
impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = Pieces::from(self.start).with_offset(self.offset);
        // Parse and FromStr only build schedules that pass check_storable.
        let p = match self.tz.iana_name() {
            Some(name) => p.with_time_zone_name(name),
            None => p.with_time_zone_offset(self.tz.to_fixed_offset().map_err(|_| fmt::Error)?),
        };
        write!(f, "at {p}")?;
        if let Some(d) = self.days {
            write!(f, " every {d}")?;
        }
        Ok(())
    }
}

impl FromStr for Schedule {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Schedule> {
        (|| {
            if s.len() > MAX_STORED {
                bail!("too long");
            }
            let rest = s.strip_prefix("at ").context("must start with \"at \"")?;
            let (when, days) = match rest.split_once(" every ") {
                Some((w, d)) => (w, Some(Days::parse(d)?)),
                None => (rest, None),
            };
            let p = Pieces::parse(when)?;
            let time = p.time().context("the time is missing")?;
            let offset = p.to_numeric_offset().context("the UTC offset is missing")?;
            let tz = p.to_time_zone()?.context("the time zone is missing")?;
            check_storable(&tz)?;
            Ok(Schedule {
                start: p.date().to_datetime(time),
                offset,
                tz,
                days,
            })
        })()
        .with_context(|| format!("schedule {s:?}"))
    }
}

impl From<Schedule> for String {
    fn from(s: Schedule) -> String {
        s.to_string()
    }
}

impl TryFrom<String> for Schedule {
    type Error = anyhow::Error;

    fn try_from(s: String) -> Result<Schedule> {
        s.parse()
    }
}

#[cfg(test)]
mod tests;
