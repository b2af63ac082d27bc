//! The proxy's control request decoder: one line of JSON from a local client.
//!
//! Checks: nothing panics; a request that parses names a valid service and a positive timeout,
//! and serializes back to a line that parses to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proxy::config::valid_service_name;
use tether_proxy::control::{parse_request, Request, MAX_REQUEST_BYTES};

fuzz_target!(|data: &[u8]| {
    // The server refuses longer lines before parsing them.
    if data.len() > MAX_REQUEST_BYTES {
        return;
    }
    let Ok(req) = parse_request(data) else {
        return;
    };
    match &req {
        Request::Flows { service } | Request::Resume { service } => {
            assert!(valid_service_name(service))
        }
        Request::Pause {
            service,
            timeout_ms,
        } => {
            assert!(valid_service_name(service));
            assert!(timeout_ms.is_none_or(|t| t > 0));
        }
        Request::Redirect { service, .. } => assert!(valid_service_name(service)),
        _ => {}
    }
    let line = serde_json::to_vec(&req).expect("a request serializes");
    assert_eq!(parse_request(&line), Ok(req.clone()), "{}", req.name());
});
