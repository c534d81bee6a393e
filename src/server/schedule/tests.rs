use jiff::civil::date;
use jiff::tz::offset;

use super::*;

/// A civil time in Berlin (2026: CET to CEST on Sunday 29 March at 02:00,
/// back on Sunday 25 October at 03:00).
fn berlin(y: i16, m: i8, d: i8, h: i8, mi: i8) -> ZonedDateTime {
    date(y, m, d)
        .at(h, mi, 0, 0)
        .in_tz("Europe/Berlin")
        .unwrap()
}

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn parse(at: &str, every: Option<&str>, now: &ZonedDateTime) -> Schedule {
    Schedule::parse(at, every, now).unwrap()
}

/// The first `n` fires after `from`.
fn fires(s: &Schedule, from: Timestamp, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut t = from;
    for _ in 0..n {
        t = s.next_fire(t).unwrap();
        out.push(t.to_string());
    }
    out
}

fn err(at: &str, every: Option<&str>) -> String {
    let now = berlin(2026, 5, 11, 12, 0);
    format!("{:#}", Schedule::parse(at, every, &now).unwrap_err())
}

#[test]
fn a_time_of_day_is_the_next_one() {
    let s = parse("14:30", None, &berlin(2026, 5, 11, 12, 0));
    assert_eq!(s.to_string(), "at 2026-05-11T14:30:00+02:00[Europe/Berlin]");
    let s = parse("14:30", None, &berlin(2026, 5, 11, 14, 30));
    assert_eq!(s.to_string(), "at 2026-05-12T14:30:00+02:00[Europe/Berlin]");
    let s = parse("9:05:07", None, &berlin(2026, 12, 31, 23, 0));
    assert_eq!(s.to_string(), "at 2027-01-01T09:05:07+01:00[Europe/Berlin]");
    assert_eq!(
        s.next_fire(Timestamp::MIN),
        Some(ts("2027-01-01T08:05:07Z"))
    );
    assert!(!s.is_repeating());
}

#[test]
fn a_date_and_time() {
    let now = berlin(2026, 5, 11, 12, 0);
    for at in [
        "2026-12-24 02:00",
        "2026-12-24T02:00",
        " 2026-12-24  02:00:00 ",
    ] {
        let s = parse(at, None, &now);
        assert_eq!(s.to_string(), "at 2026-12-24T02:00:00+01:00[Europe/Berlin]");
        assert_eq!(s.next_fire(now.timestamp()), Some(ts("2026-12-24T01:00Z")));
    }
}

#[test]
fn a_delay_from_now_in_whole_seconds() {
    let now = date(2026, 5, 11)
        .at(1, 0, 0, 500_000_000)
        .in_tz("Europe/Berlin")
        .unwrap();
    let cases = [
        ("+30m", "2026-05-10T23:30:00Z"),
        ("+2h", "2026-05-11T01:00:00Z"),
        ("+1h30m", "2026-05-11T00:30:00Z"),
        ("+1d", "2026-05-11T23:00:00Z"),
    ];
    for (at, want) in cases {
        let s = parse(at, None, &now);
        assert_eq!(s.next_fire(now.timestamp()), Some(ts(want)), "{at}");
    }
}

#[test]
fn errors_name_what_is_wrong() {
    let cases = [
        ("25:00", "--at \"25:00\": hour must be 0-23"),
        ("12:60", "--at \"12:60\": minute must be 0-59"),
        ("12:00:61", "--at \"12:00:61\": second must be 0-59"),
        (
            "12",
            "--at \"12\": the time must be HH:MM or HH:MM:SS, not \"12\"",
        ),
        (
            "ab:00",
            "--at \"ab:00\": hour must be a number of at most 2 digits, not \"ab\"",
        ),
        (
            "2026-13-01 02:00",
            "--at \"2026-13-01 02:00\": month must be 1-12",
        ),
        (
            "2026-02-30 02:00",
            "--at \"2026-02-30 02:00\": day must be 1-28 in 2026-02",
        ),
        (
            "2026/12/24 02:00",
            "--at \"2026/12/24 02:00\": the date must be YYYY-MM-DD, not \"2026/12/24\"",
        ),
        (
            "2026-05-11 11:59",
            "--at \"2026-05-11 11:59\": 2026-05-11T11:59:00 is in the past (now 2026-05-11 12:00 CEST)",
        ),
        ("+0m", "--at \"+0m\": the duration must be more than zero"),
        ("+-5m", "--at \"+-5m\": the duration must be more than zero"),
    ];
    for (at, want) in cases {
        assert_eq!(err(at, None), want);
    }
    assert!(err("+soon", None).starts_with("--at \"+soon\": not a duration such as +30m"));
    assert_eq!(
        err(&"1".repeat(65), None),
        format!("--at \"{}\": too long", "1".repeat(65))
    );
    let not_a_day = "is not a day (mon, tue, wed, thu, fri, sat, sun; or day, weekday, weekend)";
    assert_eq!(
        err("02:00", Some("mon,xyz")),
        format!("--every \"mon,xyz\": \"xyz\" {not_a_day}")
    );
    assert_eq!(
        err("02:00", Some("")),
        format!("--every \"\": \"\" {not_a_day}")
    );
    assert_eq!(
        err("02:00", Some("mon-")),
        format!("--every \"mon-\": \"\" {not_a_day}")
    );
}

#[test]
fn days_of_the_week() {
    let days = |s: &str| Days::parse(s).unwrap().to_string();
    assert_eq!(days("day"), "day");
    assert_eq!(days("Daily"), "day");
    assert_eq!(days("mon-sun"), "day");
    assert_eq!(days("weekday"), "weekday");
    assert_eq!(days("mon,tue,wed,thu,fri"), "weekday");
    assert_eq!(days("sat,sun"), "weekend");
    assert_eq!(days("wed, mon,wed"), "mon,wed");
    assert_eq!(days("Friday,monday"), "mon,fri");
    assert_eq!(days("fri-mon"), "mon,fri,sat,sun");
    assert_eq!(days("tue-thu"), "tue,wed,thu");
    assert_eq!(days("sun"), "sun");
}

#[test]
fn weekdays_skip_the_weekend() {
    // Friday 15 May 2026, 09:00.
    let now = berlin(2026, 5, 15, 9, 0);
    let s = parse("08:00", Some("weekday"), &now);
    assert_eq!(
        s.to_string(),
        "at 2026-05-16T08:00:00+02:00[Europe/Berlin] every weekday"
    );
    assert_eq!(
        fires(&s, now.timestamp(), 3),
        [
            "2026-05-18T06:00:00Z",
            "2026-05-19T06:00:00Z",
            "2026-05-20T06:00:00Z"
        ]
    );
    let s = parse("08:00", Some("mon,wed,fri"), &now);
    assert_eq!(
        fires(&s, now.timestamp(), 4),
        [
            "2026-05-18T06:00:00Z",
            "2026-05-20T06:00:00Z",
            "2026-05-22T06:00:00Z",
            "2026-05-25T06:00:00Z"
        ]
    );
    let s = parse("08:00", Some("sun"), &now);
    assert_eq!(
        fires(&s, now.timestamp(), 2),
        ["2026-05-17T06:00:00Z", "2026-05-24T06:00:00Z"]
    );
}

#[test]
fn repeats_start_on_the_date_given() {
    // Thursday 24 December; the first Monday after is the 28th.
    let now = berlin(2026, 5, 11, 12, 0);
    let s = parse("2026-12-24 02:00", Some("mon"), &now);
    assert_eq!(
        fires(&s, now.timestamp(), 2),
        ["2026-12-28T01:00:00Z", "2027-01-04T01:00:00Z"]
    );
    assert_eq!(s.last_fire(ts("2026-12-27T00:00Z")), None);
    assert_eq!(s.next_fire(Timestamp::MIN), Some(ts("2026-12-28T01:00Z")));
    assert_eq!(
        s.last_fire(Timestamp::MAX).map(|t| t > now.timestamp()),
        Some(true)
    );
}

#[test]
fn spring_forward_moves_a_missing_time_on() {
    // 02:30 does not exist on 29 March: it fires at 03:30 CEST, once.
    let now = berlin(2026, 3, 27, 12, 0);
    let s = parse("02:30", Some("day"), &now);
    assert_eq!(
        fires(&s, now.timestamp(), 3),
        [
            "2026-03-28T01:30:00Z",
            "2026-03-29T01:30:00Z",
            "2026-03-30T00:30:00Z"
        ]
    );
    assert_eq!(
        s.next_fire(ts("2026-03-29T01:30Z")),
        Some(ts("2026-03-30T00:30Z"))
    );

    // Once: the stored form keeps 02:30 (what was asked) and the offset
    // before the gap, which is the instant 03:30 CEST.
    let s = parse("02:30", None, &berlin(2026, 3, 28, 12, 0));
    assert_eq!(s.to_string(), "at 2026-03-29T02:30:00+01:00[Europe/Berlin]");
    assert_eq!(s.next_fire(Timestamp::MIN), Some(ts("2026-03-29T01:30Z")));
    let back: Schedule = s.to_string().parse().unwrap();
    assert_eq!(back, s);
    assert_eq!(
        back.next_fire(Timestamp::MIN),
        Some(ts("2026-03-29T01:30Z"))
    );

    // Repeating from the gap day: the next days are 02:30 again, not 03:30.
    let s = parse("02:30", Some("day"), &berlin(2026, 3, 28, 12, 0));
    assert_eq!(
        fires(&s, Timestamp::MIN, 2),
        ["2026-03-29T01:30:00Z", "2026-03-30T00:30:00Z"]
    );
}

#[test]
fn fall_back_fires_once_in_the_repeated_hour() {
    // 02:30 happens twice on 25 October (CEST, then CET): fire at the first.
    let now = berlin(2026, 10, 23, 12, 0);
    let s = parse("02:30", Some("day"), &now);
    assert_eq!(
        fires(&s, now.timestamp(), 3),
        [
            "2026-10-24T00:30:00Z",
            "2026-10-25T00:30:00Z",
            "2026-10-26T01:30:00Z"
        ]
    );
    let first = ts("2026-10-25T00:30Z");
    assert_eq!(s.next_fire(first), Some(ts("2026-10-26T01:30Z")));
    // At the second 02:30 (CET) nothing is due again.
    let second = ts("2026-10-25T01:30Z");
    assert_eq!(
        s.due(Some(first), second),
        Due::Wait(ts("2026-10-26T01:30Z"))
    );

    // Typed during the first 02:40, "+30m" is the second 02:10: the stored
    // offset keeps it there (the first 02:10 is half an hour ago).
    let now = ts("2026-10-25T00:40Z").to_zoned_datetime(TimeZone::get("Europe/Berlin").unwrap());
    let s = parse("+30m", None, &now);
    assert_eq!(s.to_string(), "at 2026-10-25T02:10:00+01:00[Europe/Berlin]");
    assert_eq!(s.next_fire(Timestamp::MIN), Some(ts("2026-10-25T01:10Z")));
    let back: Schedule = s.to_string().parse().unwrap();
    assert_eq!(
        back.next_fire(Timestamp::MIN),
        Some(ts("2026-10-25T01:10Z"))
    );
    assert_eq!(
        s.due(None, now.timestamp()),
        Due::Wait(ts("2026-10-25T01:10Z"))
    );
}

#[test]
fn a_one_time_schedule_fires_once_late_within_grace() {
    let s = parse("2026-12-24 02:00", None, &berlin(2026, 5, 11, 12, 0));
    let t = ts("2026-12-24T01:00Z");
    let min = |m: i64| SignedDuration::from_mins(m);
    assert_eq!(s.due(None, t - min(60)), Due::Wait(t));
    assert_eq!(s.due(None, t), Due::Fire(t));
    assert_eq!(s.due(None, t + min(30)), Due::Fire(t));
    assert_eq!(s.due(None, t + min(31)), Due::Missed(t));
    assert_eq!(s.due(Some(t), t), Due::Done);
    assert_eq!(s.due(Some(t), t + min(31)), Due::Done);
    assert_eq!(s.due(Some(t), t - min(60)), Due::Done);
    assert_eq!(s.next_fire(t), None);
}

#[test]
fn a_long_outage_fires_at_most_once() {
    let now = berlin(2026, 5, 11, 12, 0);
    let s = parse("02:00", Some("day"), &now);
    let day = |d: i8| berlin(2026, 5, d, 2, 0).timestamp();
    let min = |m: i64| SignedDuration::from_mins(m);
    assert_eq!(s.due(None, now.timestamp()), Due::Wait(day(12)));
    assert_eq!(s.due(Some(day(12)), day(12)), Due::Wait(day(13)));
    // Down from the 12th to the 15th at 02:10: only the 15th fires.
    assert_eq!(s.due(Some(day(12)), day(15) + min(10)), Due::Fire(day(15)));
    assert_eq!(s.due(Some(day(15)), day(15) + min(10)), Due::Wait(day(16)));
    // Down until 04:00: the 15th is missed, said once, then waited past.
    assert_eq!(
        s.due(Some(day(12)), day(15) + min(120)),
        Due::Missed(day(15))
    );
    assert_eq!(s.due(Some(day(15)), day(15) + min(120)), Due::Wait(day(16)));
    // The clock set back a day after the 15th fired: nothing fires again.
    assert_eq!(s.due(Some(day(15)), day(14) + min(5)), Due::Wait(day(16)));
}

#[test]
fn the_stored_form_round_trips() {
    let now = berlin(2026, 5, 11, 12, 0);
    let schedules = [
        parse("02:00", None, &now),
        parse("2026-12-24 02:00", Some("mon,wed"), &now),
        parse("07:15:30", Some("weekday"), &now),
        parse("+90m", Some("fri-sun"), &now),
        parse("02:00", Some("weekend"), &now.with_time_zone(TimeZone::UTC)),
        parse(
            "02:00",
            Some("day"),
            &now.with_time_zone(TimeZone::fixed(offset(-5))),
        ),
    ];
    for s in schedules {
        let text = s.to_string();
        let back: Schedule = text.parse().unwrap();
        assert_eq!(back, s, "{text}");
        assert_eq!(back.to_string(), text);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, format!("\"{text}\""));
        let back: Schedule = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }
    let s: Schedule = "at 2026-12-24T02:00:00+01:00[Europe/Paris] every mon,wed"
        .parse()
        .unwrap();
    assert_eq!(
        s.to_string(),
        "at 2026-12-24T02:00:00+01:00[Europe/Paris] every mon,wed"
    );
    assert_eq!(s.time_zone().iana_name(), Some("Europe/Paris"));
    let s = parse(
        "02:00",
        None,
        &now.with_time_zone(TimeZone::fixed(offset(-5))),
    );
    // 12:00 in Berlin is 05:00 at -05:00: 02:00 is tomorrow's.
    assert_eq!(s.to_string(), "at 2026-05-12T02:00:00-05:00[-05:00]");
}

#[test]
fn a_bad_stored_form_is_refused() {
    let cases = [
        ("", "must start with \"at \""),
        ("at ", "expected four digit year"),
        (
            "at 2026-12-24T02:00:00[Europe/Berlin]",
            "the UTC offset is missing",
        ),
        ("at 2026-12-24[Europe/Berlin]", "the time is missing"),
        ("at 2026-12-24T02:00:00+01:00", "the time zone is missing"),
        ("at 2026-12-24T02:00:00+01:00[Nowhere/Land]", "Nowhere/Land"),
        (
            "at 2026-12-24T02:00:00+01:00[Europe/Berlin] every xyz",
            "\"xyz\" is not a day",
        ),
        (
            "at 2026-12-24T02:00:00+01:00[Europe/Berlin] daily",
            "unparsed input \" daily\"",
        ),
    ];
    for (text, want) in cases {
        let e = format!("{:#}", text.parse::<Schedule>().unwrap_err());
        assert!(e.starts_with(&format!("schedule {text:?}: ")), "{e}");
        assert!(e.contains(want), "{text}: {e}");
    }
    let long = format!("at {}", "x".repeat(300));
    let e = format!("{:#}", long.parse::<Schedule>().unwrap_err());
    assert!(e.ends_with(": too long"), "{e}");
    assert!(serde_json::from_str::<Schedule>("\"at soon\"").is_err());
}

#[test]
fn a_zone_without_a_name_is_refused() {
    let tz = TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap();
    let now = berlin(2026, 5, 11, 12, 0).with_time_zone(tz);
    assert_eq!(
        format!("{:#}", Schedule::parse("02:00", None, &now).unwrap_err()),
        "the server's time zone has no name: set TZ to one, such as TZ=Europe/Paris"
    );
}
