//! Protobuf's canonical JSON mapping for any message of the contract, through reflection over the
//! embedded descriptor set (prost generates no serde code).

use std::sync::OnceLock;

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET).expect("the embedded descriptor set is valid")
    })
}

/// Error converting a message to JSON.
#[derive(Debug)]
pub struct JsonError(String);

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for JsonError {}

/// The canonical JSON value of `msg`, whose fully qualified protobuf name is `full_name`
/// (e.g. `nodekeeper.v1.Event`). Enum values are written by name, default fields are left out,
/// 64-bit integers are strings, timestamps are RFC 3339: as protobuf specifies.
pub fn to_json<M: Message>(full_name: &str, msg: &M) -> Result<serde_json::Value, JsonError> {
    let desc =
        pool().get_message_by_name(full_name).ok_or_else(|| JsonError(format!("unknown message type {full_name}")))?;
    let dynamic = DynamicMessage::decode(desc, msg.encode_to_vec().as_slice())
        .map_err(|e| JsonError(format!("re-decoding {full_name}: {e}")))?;
    let options = SerializeOptions::new().skip_default_fields(true);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| JsonError(format!("serializing {full_name}: {e}")))
}
