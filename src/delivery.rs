//! `Delivery`: one item of a session's outbox.
//!
//! A delivery is shared by every session it goes to (an `Arc`), and each
//! wire form is encoded at most once, lazily, by the first writer that needs
//! it; the bytes are then shared (`Bytes`) by every other writer.

use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::ProtocolError;
use crate::notice::Notice;
use crate::outbox::Outbox;

/// A pub-sub message as the router carries it between transports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicMessage {
    /// The topic, e.g. `RAW/node1`; subscribers match a prefix of it.
    pub topic: String,
    /// The publishing node's name (the envelope's `origin`).
    pub origin: String,
    /// The payload as raw JSON, never re-parsed by the router.
    pub data: Box<RawValue>,
    /// Float Unix seconds when the message was published.
    pub ts: f64,
    /// Its number: from a numbering ZeroMQ publisher, or given by the bus
    /// (as its own origin) to what arrives without one. Sent only to the
    /// sessions that asked (`subscribe` with `"seq": true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<crate::seq::Seq>,
}

impl TopicMessage {
    /// The Unix-protocol JSON of this message:
    /// `{"type":"publish","topic":..,"origin":..,"data":..,"ts":..}`.
    pub fn to_unix_json(&self, out: &mut BytesMut) {
        out.put_slice(b"{\"type\":\"publish\",\"topic\":");
        put_json(out, &self.topic);
        out.put_slice(b",\"origin\":");
        put_json(out, &self.origin);
        out.put_slice(b",\"data\":");
        out.put_slice(self.data.get().as_bytes());
        out.put_slice(b",\"ts\":");
        put_json(out, &self.ts);
        out.put_u8(b'}');
    }

    /// [`TopicMessage::to_unix_json`] with the number, for a session that
    /// asked for it: `..,"ts":..,"seq":N,"seq_origin":"name#epoch"}` (the
    /// same as without when the message has none).
    pub fn to_unix_json_seq(&self, out: &mut BytesMut) {
        self.to_unix_json(out);
        let Some(seq) = &self.seq else {
            return;
        };
        // Reopen the object: its last byte is the closing brace.
        out.truncate(out.len() - 1);
        out.put_slice(b",\"seq\":");
        put_json(out, &seq.n);
        out.put_slice(b",\"seq_origin\":");
        put_json(out, &*seq.origin);
        out.put_u8(b'}');
    }
}

fn put_json<T: Serialize + ?Sized>(out: &mut BytesMut, v: &T) {
    let _ = serde_json::to_writer(out.writer(), v);
}

/// What the router hands to a session's outbox. Cloning it is cheap: a
/// frame is shared `Bytes`, a topic message an `Arc`.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The content, in its shared form.
    inner: Inner,
    /// The sender's receipt, when it asked for one: answered once every
    /// copy of this delivery was written (or settled otherwise).
    ack: Option<Arc<Ack>>,
    /// When this copy was first held for a gone name. It keeps the stamp
    /// through a replay to a new session and back (a client that
    /// re-registers without reading), so the hold's grace is counted from
    /// the first time, not restarted.
    held_at: Option<std::time::Instant>,
}

/// A sender's receipt for one message (`"ack": true`, ours). Shared by
/// every copy of the delivery; when the last copy goes away the sender
/// gets `{"type":"ack","id":..}`, or the error that one copy recorded
/// (`{"type":"error","code":..,"id":..}`) if a copy was dropped. So an ack
/// means "written to every receiver's socket, or held for its name".
#[derive(Debug)]
pub struct Ack {
    /// The sender's outbox (acks are replies: never dropped, counted).
    to: Outbox,
    /// The message's `id`, as raw JSON.
    id: Option<Box<RawValue>>,
    /// Why a copy was not delivered, when one was not.
    failed: OnceLock<ProtocolError>,
}

impl Ack {
    /// A receipt owed to the session behind `to` for message `id`.
    pub fn new(to: Outbox, id: Option<Box<RawValue>>) -> Arc<Ack> {
        Arc::new(Ack {
            to,
            id,
            failed: OnceLock::new(),
        })
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        let id = self.id.take();
        let notice = match self.failed.take() {
            Some(err) => Notice::error(err, id),
            None => Notice::Ack { id },
        };
        let _ = self.to.push_forced(Delivery::notice(notice));
    }
}

#[derive(Debug, Clone)]
enum Inner {
    /// A routed message, already encoded as a Unix-protocol frame (header
    /// included) once for all its targets and the hooks.
    Frame(Arc<FrameInner>),
    /// A reply meant for one connection only, ready encoded: never
    /// replayed to a later connection of the same name.
    Reply(Bytes),
    /// A reply or notice of the bus to one connection, typed; each wire
    /// form is encoded from it directly (never replayed either).
    Notice(Arc<NoticeInner>),
    /// A topic message; its Unix frame is encoded on first use.
    Topic(Arc<TopicInner>),
    /// Not content: from here on the session's writer encodes in this
    /// codec (queued in order, so what was queued before keeps its form).
    Codec(crate::codec::Codec),
    /// Not content: from here on the session's writer adds the number to
    /// topic messages (true) or not (queued in order, like `Codec`).
    Seq(bool),
    /// Another delivery in a session's own wire form (MessagePack), made by
    /// that session's writer; the original is kept so what was not written
    /// can be held for the name in its shared (JSON) form.
    Transcoded(Bytes, Box<Delivery>),
}

#[derive(Debug)]
struct NoticeInner {
    /// The notice.
    notice: Notice,
    /// What a queue charges for it, reckoned once (the same at push and
    /// at write).
    charge: usize,
    /// Its JSON frame, made by the first writer that needs it.
    json: OnceLock<Bytes>,
}

#[derive(Debug)]
struct FrameInner {
    /// The Unix JSON frame, as routed.
    json: Bytes,
    /// Its MessagePack frame, made by the first MessagePack session's
    /// writer that needs it and shared by the others (None: the JSON
    /// could not be transcoded; such a session gets it as JSON).
    msgpack: OnceLock<Option<Bytes>>,
}

#[derive(Debug)]
struct TopicInner {
    /// The message itself, for transports with their own wire form.
    msg: TopicMessage,
    /// The Unix frame, made by the first Unix writer that needs it.
    unix: OnceLock<Bytes>,
    /// Its MessagePack frame, made once, as for [`FrameInner::msgpack`].
    msgpack: OnceLock<Option<Bytes>>,
    /// The Unix frame with the number, for sessions that asked (made once).
    unix_seq: OnceLock<Bytes>,
    /// Its MessagePack frame (made once).
    msgpack_seq: OnceLock<Option<Bytes>>,
}

/// A Unix JSON frame transcoded to a MessagePack frame (length, marker,
/// MessagePack), or None when it cannot be.
fn json_frame_to_msgpack(frame: &Bytes) -> Option<Bytes> {
    let value = serde_json::from_slice::<serde_json::Value>(frame.get(4..)?).ok()?;
    let payload = crate::codec::encode(crate::codec::Codec::MsgPack, &value).ok()?;
    let mut out = BytesMut::with_capacity(4 + payload.len());
    out.put_u32(payload.len() as u32);
    out.put_slice(&payload);
    Some(out.freeze())
}

impl Delivery {
    /// Bytes a queued delivery is charged beyond its wire length: the
    /// queue slot, reference counts and bookkeeping.
    pub const OVERHEAD: usize = 64;

    fn of(inner: Inner) -> Self {
        Delivery {
            inner,
            ack: None,
            held_at: None,
        }
    }

    /// This copy stamped as held from `now`, unless it was held before.
    pub fn held(mut self, now: std::time::Instant) -> Self {
        self.held_at.get_or_insert(now);
        self
    }

    /// When this copy was first held for a gone name.
    pub fn held_at(&self) -> Option<std::time::Instant> {
        self.held_at
    }

    /// The same delivery with the sender's receipt attached.
    pub fn with_ack(mut self, ack: Arc<Ack>) -> Self {
        self.ack = Some(ack);
        self
    }

    /// This delivery without the receipt (a copy held for a gone name
    /// settles its share of the receipt: held counts as delivered).
    pub fn without_ack(&self) -> Self {
        Delivery {
            inner: self.inner.clone(),
            ack: None,
            held_at: self.held_at,
        }
    }

    /// Records that this copy was not delivered: the sender, if it asked
    /// for a receipt, gets this error naming the message's id instead.
    pub fn fail(&self, err: impl FnOnce() -> ProtocolError) {
        if let Some(a) = &self.ack {
            if a.failed.get().is_none() {
                let _ = a.failed.set(err());
            }
        }
    }

    /// Bytes this delivery is charged in a queue: its Unix wire length
    /// (computed without encoding a topic message) plus [`Self::OVERHEAD`].
    /// The same for every copy and every form, so what is charged at push
    /// is exactly what is given back at write.
    pub fn charge(&self) -> usize {
        Self::OVERHEAD
            + match &self.inner {
                Inner::Frame(f) => f.json.len(),
                Inner::Reply(b) => b.len(),
                Inner::Notice(n) => n.charge,
                Inner::Codec(_) | Inner::Seq(_) => 0,
                Inner::Topic(t) => {
                    let m = &t.msg;
                    64 + m.topic.len() + m.origin.len() + m.data.get().len()
                }
                Inner::Transcoded(_, original) => original.charge() - Self::OVERHEAD,
            }
    }

    /// A delivery of a ready Unix frame (4-byte length + JSON).
    pub fn frame(frame: Bytes) -> Self {
        Delivery::of(Inner::Frame(Arc::new(FrameInner {
            json: frame,
            msgpack: OnceLock::new(),
        })))
    }

    /// A delivery of a topic message.
    pub fn topic(msg: TopicMessage) -> Self {
        Delivery::of(Inner::Topic(Arc::new(TopicInner {
            msg,
            unix: OnceLock::new(),
            msgpack: OnceLock::new(),
            unix_seq: OnceLock::new(),
            msgpack_seq: OnceLock::new(),
        })))
    }

    /// A reply to one connection (never held for a reconnect).
    pub fn reply(frame: Bytes) -> Self {
        Delivery::of(Inner::Reply(frame))
    }

    /// A reply or notice of the bus to one connection (never held for a
    /// reconnect), encoded by its writer in the connection's wire form.
    pub fn notice(notice: Notice) -> Self {
        let json = OnceLock::new();
        // A stats reply is sized by encoding it (its size is not known
        // otherwise): encoded now, once, and that encoding is what a JSON
        // writer sends.
        let charge = match &notice {
            Notice::Stats(_) => json.get_or_init(|| notice.json_frame()).len(),
            _ => notice.size_hint(),
        };
        Delivery::of(Inner::Notice(Arc::new(NoticeInner {
            notice,
            charge,
            json,
        })))
    }

    /// A switch of the session's wire form for everything queued after it
    /// (a `register` with `"codec"`): written as nothing.
    pub fn codec(codec: crate::codec::Codec) -> Self {
        Delivery::of(Inner::Codec(codec))
    }

    /// A switch of the session's topic deliveries to carry their number
    /// (`on`) or not, for everything queued after it (a `subscribe` with
    /// `"seq"`): written as nothing.
    pub fn seq_switch(on: bool) -> Self {
        Delivery::of(Inner::Seq(on))
    }

    /// What this switches numbering to, when it is such a switch.
    pub fn numbering_switch(&self) -> Option<bool> {
        match self.inner {
            Inner::Seq(on) => Some(on),
            _ => None,
        }
    }

    /// The codec this switches to, when it is a switch.
    pub fn codec_switch(&self) -> Option<crate::codec::Codec> {
        match self.inner {
            Inner::Codec(c) => Some(c),
            _ => None,
        }
    }

    /// The notice, when this is one.
    pub fn as_notice(&self) -> Option<&Notice> {
        match &self.inner {
            Inner::Notice(n) => Some(&n.notice),
            Inner::Transcoded(_, original) => original.as_notice(),
            _ => None,
        }
    }

    /// True for a reply (as opposed to routed traffic).
    pub fn is_reply(&self) -> bool {
        match &self.inner {
            Inner::Reply(_) | Inner::Notice(_) | Inner::Codec(_) | Inner::Seq(_) => true,
            Inner::Transcoded(_, original) => original.is_reply(),
            _ => false,
        }
    }

    /// This delivery as a MessagePack frame (4-byte length, then the
    /// marker byte and MessagePack), for a session that asked for it.
    /// A delivery that cannot be transcoded stays JSON.
    pub fn to_msgpack(self) -> Delivery {
        let frame = match &self.inner {
            Inner::Transcoded(..) | Inner::Codec(_) | Inner::Seq(_) => return self,
            // A notice is encoded from its type, never from its JSON.
            Inner::Notice(n) => n.notice.msgpack_frame(),
            // Routed traffic is transcoded once for every MessagePack
            // session it goes to.
            Inner::Frame(f) => match f.msgpack.get_or_init(|| json_frame_to_msgpack(&f.json)) {
                Some(b) => b.clone(),
                None => return self,
            },
            Inner::Topic(t) => {
                let cached = t
                    .msgpack
                    .get_or_init(|| json_frame_to_msgpack(self.unix_frame()));
                match cached {
                    Some(b) => b.clone(),
                    None => return self,
                }
            }
            Inner::Reply(b) => match json_frame_to_msgpack(b) {
                Some(b) => b,
                None => return self,
            },
        };
        let (ack, held_at) = (self.ack.clone(), self.held_at);
        Delivery {
            inner: Inner::Transcoded(frame, Box::new(self.without_ack())),
            ack,
            held_at,
        }
    }

    /// This delivery in the form of a session that asked for numbers, in
    /// `codec`: a numbered topic message with its `seq` and `seq_origin`
    /// (each form made once and shared by every such session); anything
    /// else as [`Delivery::to_msgpack`] makes it, or as it is.
    pub fn to_numbered(self, codec: crate::codec::Codec) -> Delivery {
        let frame = match &self.inner {
            Inner::Topic(t) if t.msg.seq.is_some() => {
                let json = t.unix_seq.get_or_init(|| {
                    frame_of(|out| t.msg.to_unix_json_seq(out), t.msg.data.get().len())
                });
                if codec == crate::codec::Codec::MsgPack {
                    match t.msgpack_seq.get_or_init(|| json_frame_to_msgpack(json)) {
                        Some(b) => b.clone(),
                        None => json.clone(),
                    }
                } else {
                    json.clone()
                }
            }
            _ if codec == crate::codec::Codec::MsgPack => return self.to_msgpack(),
            _ => return self,
        };
        let (ack, held_at) = (self.ack.clone(), self.held_at);
        Delivery {
            inner: Inner::Transcoded(frame, Box::new(self.without_ack())),
            ack,
            held_at,
        }
    }

    /// The shared form of a delivery a writer transcoded for its session.
    pub fn into_original(self) -> Delivery {
        match self.inner {
            Inner::Transcoded(_, original) => Delivery {
                inner: original.inner,
                ack: self.ack,
                held_at: self.held_at,
            },
            inner => Delivery {
                inner,
                ack: self.ack,
                held_at: self.held_at,
            },
        }
    }

    /// The topic message, when this is one.
    pub fn topic_message(&self) -> Option<&TopicMessage> {
        match &self.inner {
            Inner::Topic(t) => Some(&t.msg),
            Inner::Frame(_)
            | Inner::Reply(_)
            | Inner::Notice(_)
            | Inner::Codec(_)
            | Inner::Seq(_) => None,
            Inner::Transcoded(_, original) => original.topic_message(),
        }
    }

    /// The Unix-protocol frame (length header + JSON), encoded at most once.
    pub fn unix_frame(&self) -> &Bytes {
        match &self.inner {
            Inner::Frame(f) => &f.json,
            Inner::Reply(b) | Inner::Transcoded(b, _) => b,
            Inner::Notice(n) => n.json.get_or_init(|| n.notice.json_frame()),
            Inner::Codec(_) | Inner::Seq(_) => {
                static NOTHING: Bytes = Bytes::new();
                &NOTHING
            }
            Inner::Topic(t) => t
                .unix
                .get_or_init(|| frame_of(|out| t.msg.to_unix_json(out), t.msg.data.get().len())),
        }
    }

    /// The JSON payload of the Unix frame (without the length header).
    pub fn unix_json(&self) -> Bytes {
        self.unix_frame().slice(4..)
    }
}

/// One Unix frame (4-byte length, then what `body` writes), sized for a
/// payload of about `hint` bytes.
fn frame_of(body: impl FnOnce(&mut BytesMut), hint: usize) -> Bytes {
    let mut out = BytesMut::with_capacity(96 + hint);
    out.put_u32(0);
    body(&mut out);
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out.freeze()
}

/// Encodes a serializable value as one Unix-protocol frame.
pub fn encode_frame<T: Serialize + ?Sized>(value: &T) -> Bytes {
    let mut out = BytesMut::with_capacity(128);
    out.put_u32(0);
    put_json(&mut out, value);
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_wire_form_is_made_once_and_shared_by_every_copy() {
        let json =
            encode_frame(&serde_json::json!({"type": "message", "to": "b", "body": [1, 2.5]}));
        let d = Delivery::frame(json.clone());
        let (a, b) = (d.clone().to_msgpack(), d.clone().to_msgpack());
        assert_eq!(a.unix_frame()[4], crate::codec::MSGPACK_MARKER);
        assert_eq!(
            a.unix_frame().as_ptr(),
            b.unix_frame().as_ptr(),
            "the second MessagePack session shares the first one's encoding"
        );
        assert_eq!(
            d.unix_frame().as_ptr(),
            json.as_ptr(),
            "the JSON form is the routed frame"
        );
        let back: serde_json::Value =
            crate::codec::decode(&a.unix_frame()[4..]).expect("MessagePack");
        assert_eq!(back["body"][1], 2.5);
        // The transcoded copy gives back the shared form, to be held.
        assert_eq!(a.into_original().unix_frame(), &json);

        let topic = Delivery::topic(TopicMessage {
            topic: "t".into(),
            origin: "o".into(),
            data: serde_json::value::to_raw_value(&1).expect("raw"),
            ts: 1.5,
            seq: None,
        });
        let (a, b) = (topic.clone().to_msgpack(), topic.to_msgpack());
        assert_eq!(a.unix_frame().as_ptr(), b.unix_frame().as_ptr());
    }
}
