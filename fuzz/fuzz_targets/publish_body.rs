//! HTTP publish bodies and query strings: every body is a number of events
//! within the batch limit or a coded error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match runcast_gateway::fuzzing::publish_body(data, None) {
        Ok(n) => assert!((1..=1000).contains(&n)),
        Err(e) => assert!(!e.message.is_empty()),
    }
    if let Ok(text) = std::str::from_utf8(data) {
        runcast_gateway::fuzzing::query(text);
        let _ =
            runcast_gateway::fuzzing::publish_body(b"{\"kind\":\"log\",\"data\":1}", Some(text));
    }
});
