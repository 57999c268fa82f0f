//! JSON objects read member by member, repeated keys included. serde's
//! maps keep the last value of a repeated key and say nothing, so a body
//! with `"amountFen": "20", ..., "amountFen": "2000"` means one thing to
//! whoever reads its first value (a log, an auditor, a proxy) and another
//! to us. Both JSON doors refuse such a body: the notify listener (a flat
//! object of raw values) and the Connect protocol (any depth).

use std::collections::HashSet;

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};

/// A JSON object's members in the order sent, repeated keys included.
pub struct Members<V>(pub Vec<(String, V)>);

impl<V> Members<V> {
    /// The first key that appears a second time.
    pub fn repeated_key(&self) -> Option<&str> {
        let mut seen = HashSet::with_capacity(self.0.len());
        self.0
            .iter()
            .map(|(key, _)| key.as_str())
            .find(|key| !seen.insert(*key))
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Members<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for ObjectVisitor<V> {
            type Value = Members<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<V>, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(ObjectVisitor(std::marker::PhantomData))
    }
}

/// Any JSON value in which no object, at any depth, has a key twice;
/// deserializing it is the check.
struct UniqueKeys;

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct AnyVisitor;
        impl<'de> Visitor<'de> for AnyVisitor {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<UniqueKeys, A::Error> {
                let members: Members<UniqueKeys> =
                    Deserialize::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                match members.repeated_key() {
                    Some(key) => Err(A::Error::custom(format_args!(
                        "the key {key:?} appears more than once in an object"
                    ))),
                    None => Ok(UniqueKeys),
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueKeys, A::Error> {
                while seq.next_element::<UniqueKeys>()?.is_some() {}
                Ok(UniqueKeys)
            }
            fn visit_bool<E>(self, _: bool) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_i64<E>(self, _: i64) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_u64<E>(self, _: u64) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_f64<E>(self, _: f64) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_str<E>(self, _: &str) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_unit<E>(self) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
        }
        d.deserialize_any(AnyVisitor)
    }
}

/// Refuses a JSON document with a key twice in any object. Other faults
/// (bad syntax) are left to whoever parses it next, with their messages.
pub fn refuse_repeated_keys(json: &[u8]) -> Result<(), String> {
    match serde_json::from_slice::<UniqueKeys>(json) {
        Ok(UniqueKeys) => Ok(()),
        Err(e) if e.is_data() => Err(e.to_string()),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_twice_is_found_at_any_depth_and_nothing_else_is_refused() {
        assert!(refuse_repeated_keys(br#"{"a": 1, "b": {"c": [1, {"d": 2}]}}"#).is_ok());
        let err = refuse_repeated_keys(br#"{"amountFen": "20", "x": 1, "amountFen": "2000"}"#)
            .unwrap_err();
        assert!(err.contains("\"amountFen\""), "{err}");
        assert!(refuse_repeated_keys(br#"{"a": [{"b": 1, "b": 2}]}"#).is_err());
        assert!(refuse_repeated_keys(br#"[{"a": {"b": null, "b": null}}]"#).is_err());
        // Escaped spellings of one key are one key.
        assert!(refuse_repeated_keys(br#"{"a": 1, "\u0061": 2}"#).is_err());
        // Not JSON: left to the next parser.
        assert!(refuse_repeated_keys(b"{not json").is_ok());
        assert!(refuse_repeated_keys(br#"{"a": 1} trailing"#).is_ok());
    }
}
