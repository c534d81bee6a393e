//! The agent's log, shipped to the server with its status reports, so a
//! failed PC can be diagnosed from the dashboard or `admin log MAC`.
//!
//! A tracing writer collects formatted lines into a bounded queue; each
//! report takes up to [`StatusReport::MAX_LOG_LINES`] of them, and puts
//! them back if the server did not take the report.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Mutex;

use crate::protocol::StatusReport;

/// Lines held while the server is away; past this the oldest are dropped
/// (and the drop is said in the next line shipped).
const QUEUE: usize = 512;

static LINES: Mutex<Queue> = Mutex::new(Queue {
    lines: VecDeque::new(),
    dropped: 0,
    partial: String::new(),
});

struct Queue {
    lines: VecDeque<String>,
    dropped: u64,
    /// Text written since the last newline.
    partial: String,
}

fn queue() -> std::sync::MutexGuard<'static, Queue> {
    LINES.lock().unwrap_or_else(|p| p.into_inner())
}

/// A `tracing_subscriber` writer: each event's formatted text, line by line.
#[derive(Clone, Copy, Default)]
pub struct Writer;

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut q = queue();
        q.partial.push_str(&String::from_utf8_lossy(buf));
        // A line never ended is shipped once it is too long to keep.
        if !q.partial.contains('\n') && q.partial.len() > StatusReport::MAX_LOG_LINE {
            q.partial.push('\n');
        }
        let Some(end) = q.partial.rfind('\n') else {
            return Ok(buf.len());
        };
        let text: String = q.partial.drain(..=end).collect();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if q.lines.len() >= QUEUE {
                q.lines.pop_front();
                q.dropped += 1;
            }
            let mut l = line.to_string();
            if l.len() > StatusReport::MAX_LOG_LINE {
                let mut cut = StatusReport::MAX_LOG_LINE - " […]".len();
                while !l.is_char_boundary(cut) {
                    cut -= 1;
                }
                l.truncate(cut);
                l.push_str(" […]");
            }
            q.lines.push_back(l);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Writer {
    type Writer = Writer;
    fn make_writer(&'a self) -> Writer {
        Writer
    }
}

/// Up to one report's worth of lines, oldest first.
pub fn take() -> Vec<String> {
    let mut q = queue();
    let mut out = Vec::new();
    if q.dropped > 0 {
        out.push(format!(
            "({} log lines dropped while the server was away)",
            q.dropped
        ));
        q.dropped = 0;
    }
    while out.len() < StatusReport::MAX_LOG_LINES
        && let Some(l) = q.lines.pop_front()
    {
        out.push(l);
    }
    out
}

/// Lines the server did not take, back at the front of the queue (which
/// may then hold one report's worth over its bound, until the next line).
pub fn put_back(lines: Vec<String>) {
    let mut q = queue();
    for l in lines.into_iter().rev() {
        q.lines.push_front(l);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_bounded_cut_and_put_back() {
        let mut w = Writer;
        let long = "x".repeat(1000);
        writeln!(w, "first\n{long}").unwrap();
        for i in 0..QUEUE {
            writeln!(w, "line {i}").unwrap();
        }
        let a = take();
        assert_eq!(a.len(), StatusReport::MAX_LOG_LINES);
        assert_eq!(a[0], "(2 log lines dropped while the server was away)");
        assert_eq!(a[1], "line 0");
        put_back(a.clone());
        assert_eq!(take(), a, "what the server did not take comes again");
        while !take().is_empty() {}
        writeln!(w, "{long}").unwrap();
        let cut = take();
        assert!(
            cut[0].len() <= StatusReport::MAX_LOG_LINE && cut[0].ends_with("[…]"),
            "{}",
            cut[0]
        );
    }
}
