//! What the Connect translation knows of each RPC, read from the same
//! descriptor set as server reflection: its message types (for protobuf
//! JSON, by prost-reflect), whether it streams, and whether it may be
//! called with GET.

use std::collections::HashMap;

use bytes::Bytes;
use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions,
};
use prost_types::method_options::IdempotencyLevel;

/// The services Connect reaches: ours, and health (so an HTTP/1.1 load
/// balancer can ask `grpc.health.v1.Health/Check` with plain JSON).
const SERVICES: &[&str] = &[
    "kongtie.v1.Auth",
    "kongtie.v1.Ticket",
    "kongtie.v1.Payment",
    "grpc.health.v1.Health",
];

#[derive(Clone)]
pub(crate) struct Method {
    pub name: String,
    input: MessageDescriptor,
    output: MessageDescriptor,
    pub server_streaming: bool,
    /// Marked `idempotency_level = NO_SIDE_EFFECTS`: Connect GET is allowed.
    pub no_side_effects: bool,
}

pub(crate) struct Schema {
    pool: DescriptorPool,
    /// By HTTP path, `/kongtie.v1.Auth/GetAccessToken`.
    methods: HashMap<String, Method>,
}

impl Schema {
    pub fn load() -> Result<Self, prost_reflect::DescriptorError> {
        let mut pool = DescriptorPool::new();
        for set in [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            // google.rpc, to show error details as JSON.
            tonic_types::pb::FILE_DESCRIPTOR_SET,
        ] {
            pool.decode_file_descriptor_set(set)?;
        }
        let mut methods = HashMap::new();
        for service in SERVICES {
            let service = pool
                .get_service_by_name(service)
                .unwrap_or_else(|| panic!("{service} is in the descriptor set"));
            for method in service.methods() {
                if method.is_client_streaming() {
                    continue;
                }
                let level = method
                    .method_descriptor_proto()
                    .options
                    .as_ref()
                    .map_or(IdempotencyLevel::IdempotencyUnknown, |o| {
                        o.idempotency_level()
                    });
                methods.insert(
                    format!("/{}/{}", service.full_name(), method.name()),
                    Method {
                        name: method.name().to_owned(),
                        input: method.input(),
                        output: method.output(),
                        server_streaming: method.is_server_streaming(),
                        // Health's proto does not mark Check, though it is
                        // a read: allowed, for plain HTTP health probes.
                        no_side_effects: level == IdempotencyLevel::NoSideEffects
                            || method.full_name() == "grpc.health.v1.Health.Check",
                    },
                );
            }
        }
        Ok(Self { pool, methods })
    }

    pub fn method(&self, path: &str) -> Option<&Method> {
        self.methods.get(path)
    }

    /// Every path Connect serves.
    #[cfg(test)]
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.methods.keys().map(String::as_str)
    }

    /// An error detail (`google.protobuf.Any`) as protobuf JSON, when its
    /// type is one we know.
    pub fn detail_json(&self, type_name: &str, value: &[u8]) -> Option<serde_json::Value> {
        let desc = self.pool.get_message_by_name(type_name)?;
        to_json_value(&DynamicMessage::decode(desc, value).ok()?)
    }
}

impl Method {
    /// A request body in protobuf JSON, as protobuf bytes. Unknown fields
    /// are ignored, as Connect's own servers do, so that a newer client
    /// still reaches an older gateway; a key sent twice is refused
    /// (`crate::json`).
    pub fn request_from_json(&self, json: &[u8]) -> Result<Vec<u8>, String> {
        crate::json::refuse_repeated_keys(json).map_err(|e| {
            format!(
                "the body is not a {} in protobuf JSON: {e}",
                self.input.full_name()
            )
        })?;
        let mut de = serde_json::Deserializer::from_slice(json);
        let message = DynamicMessage::deserialize_with_options(
            self.input.clone(),
            &mut de,
            &DeserializeOptions::new().deny_unknown_fields(false),
        )
        .and_then(|m| de.end().map(|()| m))
        .map_err(|e| {
            let name = self.input.full_name();
            // What was wrong, without serde's position (`at line 1 column
            // 948`), which means nothing to a caller.
            let text = e.to_string();
            let what = text.rsplit_once(" at line ").map_or(&*text, |(w, _)| w);
            match e.classify() {
                serde_json::error::Category::Syntax => {
                    format!("the body is not JSON ({what}); a {name} was expected")
                }
                serde_json::error::Category::Eof => format!("the body is cut short (a {name})"),
                _ => format!("the body is not a {name} in protobuf JSON: {what}"),
            }
        })?;
        Ok(message.encode_to_vec())
    }

    /// A response message's protobuf bytes as protobuf JSON.
    pub fn response_to_json(&self, proto: Bytes) -> Result<Vec<u8>, String> {
        let message = DynamicMessage::decode(self.output.clone(), proto)
            .map_err(|e| format!("decoding {}: {e}", self.output.full_name()))?;
        let mut out = Vec::with_capacity(256);
        message
            .serialize_with_options(
                &mut serde_json::Serializer::new(&mut out),
                &SerializeOptions::new(),
            )
            .map_err(|e| format!("encoding {} as JSON: {e}", self.output.full_name()))?;
        Ok(out)
    }
}

fn to_json_value(message: &DynamicMessage) -> Option<serde_json::Value> {
    message
        .serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new())
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unary_and_server_streaming_rpc_is_served_and_reads_are_marked_for_get() {
        let schema = Schema::load().unwrap();
        let mut paths: Vec<_> = schema.paths().collect();
        paths.sort();
        assert_eq!(paths.len(), 20, "{paths:?}");
        let get: Vec<_> = paths
            .iter()
            .filter(|p| schema.method(p).unwrap().no_side_effects)
            .map(|p| p.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(
            get,
            [
                "Check",
                "BuildAuthorizeUrl",
                "GetAccessToken",
                "GetConsumer",
                "GetOrder",
                "ListConsumers",
                "ListNotifications",
                "ListOrders",
                "GetJsApiTicket",
                "SignJsSdkConfig"
            ]
        );
        let streams: Vec<_> = paths
            .iter()
            .filter(|p| schema.method(p).unwrap().server_streaming)
            .collect();
        assert_eq!(
            streams,
            [
                &"/grpc.health.v1.Health/Watch",
                &"/kongtie.v1.Payment/SubscribeNotifications"
            ]
        );
    }

    #[test]
    fn json_round_trips_through_protobuf_with_canonical_names() {
        let schema = Schema::load().unwrap();
        let m = schema.method("/kongtie.v1.Payment/GetOrder").unwrap();
        let proto = m
            .request_from_json(br#"{"outTradeId": "T1", "unknownField": 1}"#)
            .unwrap();
        assert_eq!(proto, b"\n\x02T1");
        let err = m.request_from_json(br#"{"outTradeId": 5}"#).unwrap_err();
        assert!(err.contains("kongtie.v1.GetOrderRequest"), "{err}");
        let err = m.request_from_json(br#"{} trailing"#).unwrap_err();
        assert!(err.contains("trailing"), "{err}");
        let err = m
            .request_from_json(br#"{"outTradeId": "T1", "outTradeId": "T2"}"#)
            .unwrap_err();
        assert!(err.contains("more than once"), "{err}");
    }
}
