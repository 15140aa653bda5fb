//! Bytes off the agent stream: decoded as the server decodes them, then validated as the session
//! validates them. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodekeeper_eventcenter::config::LimitsConfig;
use nodekeeper_eventcenter::validate;
use nodekeeper_proto::v1::{AgentMessage, agent_message};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = AgentMessage::decode(data) else { return };
    let limits = LimitsConfig::default();
    match m.msg {
        Some(agent_message::Msg::Hello(h)) => drop(validate::hello(&h)),
        Some(agent_message::Msg::Observations(b)) => drop(validate::batch(b, limits.max_batch)),
        _ => {}
    }
});
