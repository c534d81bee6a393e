//! The AFL++ harness: `afl-fuzz -i IN -o OUT -- afl-harness TARGET`.
//! Persistent mode: one process runs many inputs, each from shared memory.

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(t) = blockswarm_fuzz::find(&name) else {
        eprintln!("afl-harness: unknown target {name:?} (see `replay --list`)");
        std::process::exit(2);
    };
    // No abort-on-panic hook: blockswarm catches the panics of third-party
    // parsers on purpose. A panic that reaches the harness still aborts.
    afl::fuzz(false, |data| (t.run)(data));
}
