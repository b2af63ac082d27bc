//! A pause at a named protocol state, for tests that must kill a process (or cut a link) at an
//! exact step: `TETHER_TEST_HOLD=<state>:<ms>` pauses the driver for `<ms>` when its machine
//! first enters `<state>` (also where an action's own outcome moves it there), before it performs
//! that step's actions; `<state>+:<ms>` pauses after them. The driver logs `test hold: ...` when
//! it starts pausing. States are the machines' `state_name()`s (`ending`, `resuming`,
//! `prepared`, `going-live`, ...). Unset, it costs nothing; it is never set in production.

use std::time::Duration;

use tracing::warn;

/// The environment variable.
pub const VAR: &str = "TETHER_TEST_HOLD";

/// A pending hold.
#[derive(Debug, Clone)]
pub struct TestHold {
    state: String,
    after_actions: bool,
    pause: Duration,
    done: bool,
}

impl TestHold {
    /// The hold asked for in the environment, if any.
    pub fn from_env() -> Option<TestHold> {
        let v = std::env::var(VAR).ok()?;
        let (state, ms) = v.split_once(':')?;
        let ms: u64 = ms.parse().ok()?;
        let (state, after_actions) = match state.strip_suffix('+') {
            Some(s) => (s, true),
            None => (state, false),
        };
        Some(TestHold {
            state: state.to_string(),
            after_actions,
            pause: Duration::from_millis(ms),
            done: false,
        })
    }

    /// Pauses if the machine is in the held state, at this position (before or after its
    /// actions), for the first time.
    pub async fn at(hold: &mut Option<TestHold>, state: &str, after_actions: bool) {
        let Some(h) = hold.as_mut() else {
            return;
        };
        if h.done || h.after_actions != after_actions || h.state != state {
            return;
        }
        h.done = true;
        warn!(
            state,
            ms = h.pause.as_millis() as u64,
            "test hold: pausing ({VAR})"
        );
        tokio::time::sleep(h.pause).await;
    }
}
