//! Whatever is stored, through the publish API or straight onto the bus as
//! a NATS client can, every run and the run list stay servable: the state,
//! frames, history pages, replay and SSE messages are valid JSON, and
//! nothing panics. (An outside client poisoned a run with data nested 130
//! levels deep.)
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    runcast_gateway::fuzzing::stored_events(data);
});
