//! The proxy's TOML configuration.
//!
//! Checks: nothing panics; a configuration that is accepted is usable as it is: it validates
//! again, survives a TOML round trip unchanged, its default pause timeout is one a pause accepts,
//! and every duration it configures can be added to the current time (deadlines are computed
//! that way) and used by the parts that take it.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tether_proxy::config::MAX_PAUSE_TIMEOUT_MS;
use tether_proxy::hold::HoldQueue;
use tether_proxy::state::ServiceState;
use tether_proxy::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_toml(text) else {
        return;
    };
    config
        .validate()
        .expect("an accepted configuration validates again");
    let again = toml::to_string(&config).expect("a configuration serializes");
    assert_eq!(
        Config::from_toml(&again).expect("its TOML parses"),
        config,
        "{again}"
    );
    let now = Instant::now();
    for s in &config.services {
        let l = s.limits;
        // The service refuses a pause longer than this, so a default beyond it is unusable.
        assert!(l.pause_timeout_ms <= MAX_PAUSE_TIMEOUT_MS, "{}", s.name);
        for d in [
            l.max_hold(),
            l.pause_timeout(),
            l.connect_timeout(),
            l.udp_idle_timeout(),
            l.hold().max_age,
        ] {
            assert!(now.checked_add(d).is_some(), "{d:?} in {}", s.name);
        }
        let mut state = ServiceState::new(s.backend);
        state
            .begin_pause(now, l.pause_timeout(), l.max_hold())
            .expect("an active service pauses");
        let mut queue = HoldQueue::new(l.hold());
        if queue.push(1u8, vec![0; 1], now).is_ok() {
            let _ = queue.next_expiry();
        }
        let _ = queue.expire(now + Duration::from_millis(1));
    }
});
