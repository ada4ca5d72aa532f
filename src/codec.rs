//! Payload codecs: JSON (the default and the only thing a reference peer
//! ever sees) and MessagePack (opt-in, `rmp-serde`).
//!
//! A MessagePack payload is always marked: its first byte is
//! [`MSGPACK_MARKER`] (`0xC1`), a byte that starts neither a JSON document
//! nor a valid UTF-8 sequence, and that MessagePack itself never uses. A
//! receiver can therefore tell the two apart from the first byte, and one
//! that did not opt in counts a codec error instead of decoding garbage.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;

/// First byte of every MessagePack-encoded payload (`0xC1` is "never used"
/// in MessagePack and can start neither JSON nor UTF-8).
pub const MSGPACK_MARKER: u8 = 0xC1;

/// Which encoding a payload uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    /// JSON text (UTF-8), the reference encoding.
    #[default]
    Json,
    /// [`MSGPACK_MARKER`] followed by MessagePack (rmp-serde), opt-in.
    MsgPack,
}

impl Codec {
    /// Detects the codec of an encoded payload from its first byte.
    pub fn detect(payload: &[u8]) -> Codec {
        if payload.first() == Some(&MSGPACK_MARKER) {
            Codec::MsgPack
        } else {
            Codec::Json
        }
    }

    /// The name used on the wire when peers negotiate the codec
    /// (`json` or `msgpack`).
    pub fn name(self) -> &'static str {
        match self {
            Codec::Json => "json",
            Codec::MsgPack => "msgpack",
        }
    }

    /// Parses a codec name (`json`, `msgpack`).
    pub fn from_name(name: &str) -> Option<Codec> {
        match name.trim().to_ascii_lowercase().as_str() {
            "json" => Some(Codec::Json),
            "msgpack" | "messagepack" => Some(Codec::MsgPack),
            _ => None,
        }
    }
}

/// Why a payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The JSON payload was invalid or did not fit the requested type.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// MessagePack encoding failed.
    #[error("msgpack encode: {0}")]
    MsgPackEncode(#[from] rmp_serde::encode::Error),
    /// The MessagePack payload was invalid or did not fit the requested type.
    #[error("msgpack decode: {0}")]
    MsgPackDecode(#[from] rmp_serde::decode::Error),
    /// A payload in one codec reached a reader that expected the other.
    #[error("payload is {found:?}, expected {expected:?}")]
    WrongCodec {
        /// The codec the payload carries.
        found: Codec,
        /// The codec the reader accepts.
        expected: Codec,
    },
    /// The payload was empty.
    #[error("empty payload")]
    Empty,
}

/// Encodes `value` with `codec` (MessagePack payloads get the marker byte).
pub fn encode<T: Serialize + ?Sized>(codec: Codec, value: &T) -> Result<Vec<u8>, CodecError> {
    match codec {
        Codec::Json => Ok(serde_json::to_vec(value)?),
        Codec::MsgPack => {
            let mut out = Vec::with_capacity(64);
            out.push(MSGPACK_MARKER);
            rmp_serde::encode::write(&mut out, value)?;
            Ok(out)
        }
    }
}

/// Decodes a payload in whichever codec its first byte says.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    match Codec::detect(payload) {
        Codec::Json => Ok(serde_json::from_slice(payload)?),
        Codec::MsgPack => Ok(rmp_serde::from_slice(&payload[1..])?),
    }
}

/// Decodes a payload that must be in `expected`; the other codec is a
/// [`CodecError::WrongCodec`], never a silent misread.
pub fn decode_strict<T: DeserializeOwned>(
    expected: Codec,
    payload: &[u8],
) -> Result<T, CodecError> {
    let found = Codec::detect(payload);
    if found != expected {
        return Err(CodecError::WrongCodec { found, expected });
    }
    decode(payload)
}

/// Turns a payload of either codec into raw JSON (MessagePack is transcoded
/// through `serde_json::Value`; JSON is validated and kept as is).
pub fn to_raw_json(payload: &[u8]) -> Result<Box<RawValue>, CodecError> {
    if payload.is_empty() {
        return Err(CodecError::Empty);
    }
    match Codec::detect(payload) {
        Codec::Json => Ok(serde_json::from_slice::<Box<RawValue>>(payload)?),
        Codec::MsgPack => {
            let value: serde_json::Value = rmp_serde::from_slice(&payload[1..])?;
            Ok(serde_json::value::to_raw_value(&value)?)
        }
    }
}

/// Transcodes raw JSON into a marked MessagePack payload.
pub fn json_to_msgpack(raw: &RawValue) -> Result<Vec<u8>, CodecError> {
    let value: serde_json::Value = serde_json::from_str(raw.get())?;
    encode(Codec::MsgPack, &value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_both_codecs() {
        let v = serde_json::json!(["Quote", 1.5, "AAPL", 1, -2.25]);
        for c in [Codec::Json, Codec::MsgPack] {
            let bytes = encode(c, &v).expect("encode");
            assert_eq!(Codec::detect(&bytes), c);
            let back: serde_json::Value = decode(&bytes).expect("decode");
            assert_eq!(back, v);
            let raw = to_raw_json(&bytes).expect("raw");
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(raw.get()).ok(),
                Some(v.clone())
            );
        }
    }

    #[test]
    fn json_floats_transcode_exactly() {
        // Found by the `msgpack` fuzz target: serde_json's default float
        // parser is one ULP off on these; the `float_roundtrip` feature
        // makes JSON -> MessagePack -> JSON keep the number.
        for text in [
            "-9.532911223794579e-28",
            "[-9.53291122379458e-28,0.1,1e-300]",
        ] {
            let raw = RawValue::from_string(text.to_owned()).expect("raw");
            let mp = json_to_msgpack(&raw).expect("to msgpack");
            assert_eq!(to_raw_json(&mp).expect("back").get(), text);
        }
    }

    #[test]
    fn strict_rejects_other_codec() {
        let bytes = encode(Codec::MsgPack, &1u8).expect("encode");
        assert!(matches!(
            decode_strict::<u8>(Codec::Json, &bytes),
            Err(CodecError::WrongCodec { .. })
        ));
        assert!(to_raw_json(b"").is_err());
        assert!(to_raw_json(&[MSGPACK_MARKER, 0xC1]).is_err());
    }
}
