//! Time-based rules: a validated schedule and the one function that decides whether it holds at an instant.
//!
//! Windows are wall-clock times in the schedule's time zone, so they follow daylight-saving changes: a window
//! 09:00-17:00 in `Europe/Paris` is 07:00-15:00 UTC in summer and 08:00-16:00 UTC in winter. On the night clocks go
//! forward, local times that do not exist never occur; on the night they go back, the repeated hour occurs twice and
//! matches both times.

use std::fmt;

use ces_api::Weekday;

use crate::ports::parse_decimal;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Minutes since local midnight, 0..=1440 (1440 only as an end: `24:00`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimeOfDay(pub u16);

impl TimeOfDay {
    pub fn parse(s: &str, allow_24: bool) -> Result<TimeOfDay, String> {
        let bad = || format!("`{s}` is not a time HH:MM");
        let (h, m) = s.split_once(':').ok_or_else(bad)?;
        if h.len() != 2 || m.len() != 2 {
            return Err(bad());
        }
        let (h, m): (u16, u16) = (parse_decimal(h).ok_or_else(bad)?, parse_decimal(m).ok_or_else(bad)?);
        if m > 59 || h > 24 || (h == 24 && (m != 0 || !allow_24)) {
            return Err(bad());
        }
        Ok(TimeOfDay(h * 60 + m))
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.0 / 60, self.0 % 60)
    }
}

impl Serialize for TimeOfDay {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TimeOfDay {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        TimeOfDay::parse(&String::deserialize(d)?, true).map_err(serde::de::Error::custom)
    }
}

/// A validated window. `start > end` crosses midnight into the next day.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Days on which the window starts (all seven when the manifest lists none).
    pub days: Vec<Weekday>,
    pub start: TimeOfDay,
    pub end: TimeOfDay,
}

/// A span of one UTC day: `day` (Monday = 0), seconds since UTC midnight `start` (included) to `end` (excluded,
/// at most 86400).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UtcSpan {
    pub day: u8,
    pub start: u32,
    pub end: u32,
}

impl UtcSpan {
    /// Does the span hold at this UTC instant?
    pub fn holds_at(&self, at: Timestamp) -> bool {
        let t = at.as_second().rem_euclid(86_400 * 7);
        // 1970-01-01 was a Thursday (Monday = 0: day 3).
        let day = ((t / 86_400 + 3) % 7) as u8;
        let sec = (t % 86_400) as u32;
        day == self.day && self.start <= sec && sec < self.end
    }
}

/// A validated schedule with its time zone resolved.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(try_from = "ScheduleRepr", into = "ScheduleRepr")]
pub struct Schedule {
    timezone: String,
    tz: TimeZone,
    windows: Vec<Window>,
    /// Bit `d` of `day_mask[w]` is set when window `w` starts on day `d` (Monday = 0).
    day_mask: Vec<u8>,
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.timezone == other.timezone && self.windows == other.windows
    }
}

#[derive(Serialize, Deserialize)]
struct ScheduleRepr {
    timezone: String,
    windows: Vec<Window>,
}

impl TryFrom<ScheduleRepr> for Schedule {
    type Error = String;
    fn try_from(r: ScheduleRepr) -> Result<Schedule, String> {
        Schedule::new(&r.timezone, r.windows)
    }
}

impl From<Schedule> for ScheduleRepr {
    fn from(s: Schedule) -> ScheduleRepr {
        ScheduleRepr { timezone: s.timezone, windows: s.windows }
    }
}

impl Schedule {
    pub fn new(timezone: &str, windows: Vec<Window>) -> Result<Schedule, String> {
        let tz = TimeZone::get(timezone).map_err(|_| format!("unknown time zone `{timezone}`"))?;
        if windows.is_empty() {
            return Err("a schedule needs at least one window".into());
        }
        for w in &windows {
            if w.start == w.end {
                return Err(format!("window {}-{} is empty; write 00:00-24:00 for a whole day", w.start, w.end));
            }
            if w.start.0 >= 1440 {
                return Err(format!("window start {} must be before 24:00", w.start));
            }
        }
        let day_mask = windows.iter().map(|w| w.days.iter().fold(0u8, |m, d| m | 1 << d.index())).collect();
        Ok(Schedule { timezone: timezone.to_string(), tz, windows, day_mask })
    }

    /// Builds a schedule from the API form, reporting the first problem.
    pub fn from_api(s: &ces_api::Schedule) -> Result<Schedule, String> {
        let mut windows = Vec::with_capacity(s.windows.len());
        for w in &s.windows {
            let days = if w.days.is_empty() { Weekday::ALL.to_vec() } else { w.days.clone() };
            windows.push(Window {
                days,
                start: TimeOfDay::parse(&w.start, false)?,
                end: TimeOfDay::parse(&w.end, true)?,
            });
        }
        Schedule::new(s.timezone.as_deref().unwrap_or("UTC"), windows)
    }

    pub fn timezone(&self) -> &str {
        &self.timezone
    }

    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// The schedule as weekly spans in UTC, for data planes that match UTC day and time (nft `meta day`/`meta hour`):
    /// exact from `at` until the zone's next offset change, which is returned so the caller re-renders then (`None`
    /// for zones without changes). Spans do not cross UTC midnight, are sorted and may touch.
    pub fn utc_week(&self, at: Timestamp) -> (Vec<UtcSpan>, Option<Timestamp>) {
        const DAY: i64 = 86_400;
        const WEEK: i64 = 7 * DAY;
        let offset = self.tz.to_offset(at).seconds() as i64;
        let mut spans = Vec::new();
        // Local second-of-week intervals (Monday 00:00 = 0), then shifted to UTC and split at UTC midnights.
        let mut push = |from: i64, to: i64| {
            let (mut a, mut b) = (from - offset, to - offset);
            a = a.rem_euclid(WEEK);
            b = a + (b - (from - offset));
            while a < b {
                let day_end = (a / DAY + 1) * DAY;
                let end = b.min(day_end);
                let day = ((a / DAY) % 7) as u8;
                spans.push(UtcSpan { day, start: (a % DAY) as u32, end: (end - (a / DAY) * DAY) as u32 });
                a = end;
            }
        };
        for (w, &mask) in self.windows.iter().zip(&self.day_mask) {
            for d in 0..7i64 {
                if mask & (1 << d) == 0 {
                    continue;
                }
                let (start, end) = (w.start.0 as i64 * 60, w.end.0 as i64 * 60);
                if start < end {
                    push(d * DAY + start, d * DAY + end);
                } else {
                    push(d * DAY + start, (d + 1) * DAY + end);
                }
            }
        }
        spans.sort_by_key(|s| (s.day, s.start, s.end));
        let next = self.tz.following(at).next().map(|t| t.timestamp());
        (spans, next)
    }

    /// The first instant after `at` at which the schedule may open or close (a window boundary, or a change of the
    /// zone's offset): a data plane that adds and removes rules at the boundaries renders again then.
    pub fn next_change(&self, at: Timestamp) -> Option<Timestamp> {
        const DAY: i64 = 86_400;
        const WEEK: i64 = 7 * DAY;
        let (spans, zone_change) = self.utc_week(at);
        let secs = at.as_second();
        // 1970-01-01 was a Thursday: three days after a Monday.
        let second_of_week = (secs + 3 * DAY).rem_euclid(WEEK);
        let next = spans
            .iter()
            .flat_map(|s| [s.day as i64 * DAY + s.start as i64, s.day as i64 * DAY + s.end as i64])
            .map(|b| (b - second_of_week).rem_euclid(WEEK))
            .filter(|d| *d > 0)
            .min()
            .and_then(|d| Timestamp::from_second(secs + d).ok());
        match (next, zone_change) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Does the schedule hold at instant `at`?
    pub fn active_at(&self, at: Timestamp) -> bool {
        let local = self.tz.to_datetime(at);
        let minute = local.hour() as u16 * 60 + local.minute() as u16;
        let day = local.weekday().to_monday_zero_offset() as u8;
        let yesterday = (day + 6) % 7;
        self.windows.iter().zip(&self.day_mask).any(|(w, &mask)| {
            let on = |d: u8| mask & (1 << d) != 0;
            if w.start < w.end {
                on(day) && w.start.0 <= minute && minute < w.end.0
            } else {
                (on(day) && minute >= w.start.0) || (on(yesterday) && minute < w.end.0)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(tz: &str, days: &[Weekday], start: &str, end: &str) -> Schedule {
        Schedule::new(
            tz,
            vec![Window {
                days: days.to_vec(),
                start: TimeOfDay::parse(start, false).unwrap(),
                end: TimeOfDay::parse(end, true).unwrap(),
            }],
        )
        .unwrap()
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn times_are_two_digits_each_as_the_crd_pattern_says() {
        assert_eq!(TimeOfDay::parse("09:30", false), Ok(TimeOfDay(570)));
        assert_eq!(TimeOfDay::parse("24:00", true), Ok(TimeOfDay(1440)));
        for bad in ["+9:00", "09:+5", "9:00", "24:00", "23:60", " 9:00"] {
            assert!(TimeOfDay::parse(bad, false).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn utc_weeks_agree_with_active_at_until_the_next_offset_change() {
        // Every minute of two weeks around the spring-forward and fall-back changes in Paris, New York and UTC,
        // for windows inside a day and across midnight: the UTC spans say what `active_at` says.
        let cases = [
            sched("Europe/Paris", &[Weekday::Mon, Weekday::Fri], "09:00", "17:30"),
            sched("America/New_York", &[Weekday::Sat], "22:00", "04:00"),
            sched("UTC", &Weekday::ALL, "00:00", "24:00"),
            sched("Asia/Kolkata", &[Weekday::Sun], "23:45", "00:15"),
        ];
        for s in &cases {
            for start in ["2026-03-25T00:00:00Z", "2026-10-21T00:00:00Z", "2026-11-26T00:00:00Z"] {
                let at = at(start);
                let (spans, until) = s.utc_week(at);
                let end = until.unwrap_or(at + jiff::SignedDuration::from_hours(24 * 14));
                let mut t = at;
                while t < end && t < at + jiff::SignedDuration::from_hours(24 * 14) {
                    let by_spans = spans.iter().any(|sp| sp.holds_at(t));
                    assert_eq!(by_spans, s.active_at(t), "{} at {t}: spans {spans:?}", s.timezone());
                    t += jiff::SignedDuration::from_mins(7);
                }
            }
        }
    }

    #[test]
    fn plain_window_is_half_open() {
        let s = sched("UTC", &Weekday::ALL, "09:00", "17:00");
        assert!(!s.active_at(at("2026-11-26T08:59:59Z")));
        assert!(s.active_at(at("2026-11-26T09:00:00Z")));
        assert!(s.active_at(at("2026-11-26T16:59:59Z")));
        assert!(!s.active_at(at("2026-11-26T17:00:00Z")));
    }

    #[test]
    fn days_are_local_days() {
        // 2026-11-27 is a Friday.
        let s = sched("UTC", &[Weekday::Fri], "00:00", "24:00");
        assert!(s.active_at(at("2026-11-27T23:59:00Z")));
        assert!(!s.active_at(at("2026-11-26T12:00:00Z")));
        // 23:30 UTC on Thursday is already Friday in Tokyo.
        let tokyo = sched("Asia/Tokyo", &[Weekday::Fri], "00:00", "24:00");
        assert!(tokyo.active_at(at("2026-11-26T23:30:00Z")));
    }

    #[test]
    fn window_across_midnight_belongs_to_its_start_day() {
        // Friday 22:00 to Saturday 06:00.
        let s = sched("UTC", &[Weekday::Fri], "22:00", "06:00");
        assert!(s.active_at(at("2026-11-27T22:00:00Z")), "Friday 22:00");
        assert!(s.active_at(at("2026-11-28T05:59:00Z")), "Saturday 05:59");
        assert!(!s.active_at(at("2026-11-28T06:00:00Z")), "Saturday 06:00");
        assert!(!s.active_at(at("2026-11-28T22:30:00Z")), "Saturday 22:30 is not a Friday start");
        assert!(!s.active_at(at("2026-11-27T05:00:00Z")), "Friday 05:00 belongs to a Thursday start");
    }

    #[test]
    fn follows_daylight_saving_in_the_schedule_zone() {
        // New York springs forward on 2026-03-08 at 02:00 EST -> 03:00 EDT.
        let s = sched("America/New_York", &Weekday::ALL, "01:00", "03:00");
        assert!(s.active_at(at("2026-03-08T06:30:00Z")), "01:30 EST");
        assert!(!s.active_at(at("2026-03-08T07:30:00Z")), "03:30 EDT: the hour 02:00-03:00 never happened");
        // Same local window, different UTC instant across the change: 09:00 local.
        let nine = sched("America/New_York", &Weekday::ALL, "09:00", "09:01");
        assert!(nine.active_at(at("2026-03-06T14:00:00Z")), "09:00 EST = 14:00 UTC");
        assert!(nine.active_at(at("2026-03-09T13:00:00Z")), "09:00 EDT = 13:00 UTC");
        assert!(!nine.active_at(at("2026-03-09T14:00:00Z")));
        // Falls back on 2026-11-01 at 02:00 EDT -> 01:00 EST: 01:30 happens twice, both match.
        let s = sched("America/New_York", &Weekday::ALL, "01:00", "02:00");
        assert!(s.active_at(at("2026-11-01T05:30:00Z")), "01:30 EDT");
        assert!(s.active_at(at("2026-11-01T06:30:00Z")), "01:30 EST");
        assert!(!s.active_at(at("2026-11-01T07:30:00Z")), "02:30 EST");
    }

    #[test]
    fn midnight_crossing_window_over_dst_change() {
        // Paris: 2026-03-29 02:00 CET -> 03:00 CEST. Window Sat 23:00 - Sun 04:00 local.
        let s = sched("Europe/Paris", &[Weekday::Sat], "23:00", "04:00");
        assert!(s.active_at(at("2026-03-28T22:30:00Z")), "Sat 23:30 CET");
        assert!(s.active_at(at("2026-03-29T01:30:00Z")), "Sun 03:30 CEST");
        assert!(!s.active_at(at("2026-03-29T02:00:00Z")), "Sun 04:00 CEST ends it (only 4 real hours)");
    }

    #[test]
    fn rejects_bad_schedules() {
        let w = |s: &str, e: &str| Window {
            days: Weekday::ALL.to_vec(),
            start: TimeOfDay::parse(s, false).unwrap(),
            end: TimeOfDay::parse(e, true).unwrap(),
        };
        assert!(Schedule::new("Mars/Olympus", vec![w("01:00", "02:00")]).unwrap_err().contains("unknown time zone"));
        assert!(Schedule::new("UTC", vec![w("01:00", "01:00")]).unwrap_err().contains("empty"));
        assert!(Schedule::new("UTC", vec![]).is_err());
        assert!(TimeOfDay::parse("24:00", false).is_err());
        assert!(TimeOfDay::parse("7:00", false).is_err());
        assert!(TimeOfDay::parse("12:60", false).is_err());
        assert_eq!(TimeOfDay::parse("24:00", true).unwrap(), TimeOfDay(1440));
    }

    #[test]
    fn serde_round_trip_validates() {
        let s = sched("Europe/Paris", &[Weekday::Mon], "22:00", "06:00");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"{"timezone":"Europe/Paris","windows":[{"days":["Mon"],"start":"22:00","end":"06:00"}]}"#);
        let back: Schedule = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert!(serde_json::from_str::<Schedule>(r#"{"timezone":"Nowhere/X","windows":[]}"#).is_err());
    }

    #[test]
    fn the_next_change_is_the_next_window_boundary() {
        let s = sched("Europe/Berlin", &[Weekday::Mon, Weekday::Tue], "09:00", "17:00");
        let at = |t: &str| t.parse::<Timestamp>().unwrap();
        // Monday 2026-11-30 08:00 Berlin (07:00Z): opens at 09:00 (08:00Z).
        assert_eq!(s.next_change(at("2026-11-30T07:00:00Z")), Some(at("2026-11-30T08:00:00Z")));
        // Inside the window: closes at 17:00 (16:00Z).
        assert_eq!(s.next_change(at("2026-11-30T08:00:00Z")), Some(at("2026-11-30T16:00:00Z")));
        assert_eq!(s.next_change(at("2026-11-30T12:34:56.5Z")), Some(at("2026-11-30T16:00:00Z")));
        // Tuesday evening: the next opening is Monday 09:00.
        assert_eq!(s.next_change(at("2026-12-01T20:00:00Z")), Some(at("2026-12-07T08:00:00Z")));
        for t in ["2026-11-30T07:59:59Z", "2026-11-30T08:00:01Z", "2026-12-02T00:00:00Z"] {
            let n = s.next_change(at(t)).unwrap();
            assert!(n > at(t));
            let before = n.checked_sub(jiff::SignedDuration::from_secs(1)).unwrap();
            assert_ne!(s.active_at(before), s.active_at(n), "{t}: {n} is a real boundary");
        }
    }
}
