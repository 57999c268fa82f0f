//! The Kongtie signature, in both directions: requests we send and
//! notifications we receive are signed the same way.
//!
//! `Sign` is the lowercase hex MD5 of `K1=V1&K2=V2&...&Kn=Vn&TOKEN`, the
//! pairs in the document's "signature key order" and the secret appended
//! bare after the last `&`.

use md5::{Digest, Md5};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

/// Signs `pairs` (in signing order, values exactly as sent) with `token`.
pub fn sign(pairs: &[(&str, &str)], token: &SecretString) -> String {
    let mut md5 = Md5::new();
    for (key, value) in pairs {
        md5.update(key.as_bytes());
        md5.update(b"=");
        md5.update(value.as_bytes());
        md5.update(b"&");
    }
    md5.update(token.expose_secret().as_bytes());
    hex::encode(md5.finalize())
}

/// Checks a received `Sign` in constant time. Upper-case hex is accepted:
/// the document says lowercase, but case carries no meaning in hex.
pub fn verify(pairs: &[(&str, &str)], token: &SecretString, given: &str) -> bool {
    let expected = sign(pairs, token);
    let given = given.to_ascii_lowercase();
    expected.as_bytes().ct_eq(given.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC_TOKEN: &str = "#wugf543sxcv5*$#";

    #[test]
    fn matches_the_documents_get_access_token_example() {
        let token = SecretString::from(DOC_TOKEN);
        let sign = sign(&[("TimeStamp", "1111"), ("SourceFrom", "JSJ")], &token);
        assert_eq!(sign, "4861c42e141e357f98ad4763b616b3b7");
    }

    #[test]
    fn verify_accepts_the_right_sign_and_nothing_else() {
        let token = SecretString::from(DOC_TOKEN);
        let pairs = [("TimeStamp", "1111"), ("SourceFrom", "JSJ")];
        assert!(verify(&pairs, &token, "4861c42e141e357f98ad4763b616b3b7"));
        assert!(verify(&pairs, &token, "4861C42E141E357F98AD4763B616B3B7"));
        assert!(!verify(&pairs, &token, "4861c42e141e357f98ad4763b616b3b8"));
        assert!(!verify(&pairs, &token, ""));
        assert!(!verify(
            &[("TimeStamp", "1112"), ("SourceFrom", "JSJ")],
            &token,
            "4861c42e141e357f98ad4763b616b3b7"
        ));
        assert!(!verify(
            &pairs,
            &SecretString::from("other"),
            "4861c42e141e357f98ad4763b616b3b7"
        ));
    }
}
