//! The five-byte envelope that gRPC frames and Connect stream messages
//! share: a flags byte, a big-endian length, the message.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde_json::{Map, Value, json};
use tonic::{Code, Status};

use super::{error::error_json, schema::Schema};

/// Connect's flag of a compressed message (gRPC's too).
const COMPRESSED: u8 = 0x01;
/// Connect's flag of the end-of-stream message.
const END_STREAM: u8 = 0x02;

pub(crate) fn wrap(flags: u8, message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(flags);
    out.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    out.put_slice(message);
    out.freeze()
}

/// The first whole message in `buffer`, taken out of it; `None` until one
/// has arrived.
pub(crate) fn take(buffer: &mut BytesMut) -> Option<Result<Bytes, String>> {
    if buffer.len() < 5 {
        return None;
    }
    let flags = buffer[0];
    let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
    if buffer.len() < 5 + len {
        return None;
    }
    buffer.advance(5);
    let message = buffer.split_to(len).freeze();
    Some(if flags & COMPRESSED != 0 {
        Err("a compressed message, and no compression was agreed".to_owned())
    } else {
        Ok(message)
    })
}

/// Exactly one message, as a unary call has.
pub(crate) fn single(bytes: Bytes) -> Result<Bytes, String> {
    let mut buffer = BytesMut::from(bytes);
    let message = take(&mut buffer).unwrap_or_else(|| Err("no whole message".to_owned()))?;
    if !buffer.is_empty() {
        return Err("more than one message".to_owned());
    }
    Ok(message)
}

/// Connect's end-of-stream message: the error, if any, and the trailers as
/// metadata, in JSON whatever the stream's codec.
pub(crate) fn end_stream(
    status: &Status,
    schema: &Schema,
    trailers: &axum::http::HeaderMap,
) -> Bytes {
    let mut end = Map::new();
    if status.code() != Code::Ok {
        end.insert("error".into(), error_json(status, schema));
    }
    let mut metadata = Map::new();
    for (name, value) in trailers {
        if name.as_str().starts_with("grpc-") {
            continue;
        }
        if let Ok(v) = value.to_str() {
            let entry = metadata
                .entry(name.as_str().to_owned())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(values) = entry {
                values.push(json!(v));
            }
        }
    }
    if !metadata.is_empty() {
        end.insert("metadata".into(), Value::Object(metadata));
    }
    wrap(
        END_STREAM,
        &serde_json::to_vec(&Value::Object(end)).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_taken_whole_however_the_bytes_arrive() {
        let two = [wrap(0, b"abc"), wrap(0, b"")].concat();
        let mut buffer = BytesMut::new();
        let mut got = Vec::new();
        for byte in two {
            buffer.put_u8(byte);
            while let Some(m) = take(&mut buffer) {
                got.push(m.unwrap());
            }
        }
        assert_eq!(got, [Bytes::from_static(b"abc"), Bytes::new()]);
        assert!(
            take(&mut BytesMut::from(&wrap(1, b"x")[..]))
                .unwrap()
                .is_err()
        );
        assert!(single(Bytes::from([wrap(0, b"a"), wrap(0, b"b")].concat())).is_err());
        assert!(single(Bytes::from_static(b"\0\0\0")).is_err());
    }
}
