//! Hostile ZeroMQ peers: one peer's bytes never corrupt another's stream.

mod common;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::eventually;
use common::zmq::{raw_peer, start_proxy};
use hermes_bus::transports::zmq::zmtp::{Inbound, SocketType};
use tokio::io::AsyncWriteExt;

const LIMIT: Duration = Duration::from_secs(60);

/// The 111-byte attack: a topic frame with MORE, then a LONG frame whose
/// length is `len`, then some bytes.
fn length_attack(len: u64) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u8(0x01); // MORE, short
    b.put_u8(5);
    b.put_slice(b"\"T/x/");
    b.put_u8(0x03); // MORE | LONG
    b.put_u64(len);
    b.put_slice(&[b'A'; 95]);
    b
}

#[tokio::test]
async fn length_wrap_from_one_publisher_reaches_no_subscriber() {
    tokio::time::timeout(LIMIT, async {
        for len in [u64::MAX - 7, u64::MAX - 90, 1u64 << 63, (1u64 << 63) + 1] {
            let proxy = start_proxy(|_| {}).await;
            let mut sub = raw_peer(&proxy.back(), SocketType::Sub).await;
            sub.subscribe(b"").await;
            assert!(
                eventually(Duration::from_secs(10), || proxy
                    .stats
                    .snapshot()
                    .subscriptions
                    == 1)
                .await
            );
            let mut attacker = raw_peer(&proxy.front(), SocketType::Pub).await;
            let mut honest = raw_peer(&proxy.front(), SocketType::Pub).await;
            // Let the proxy replay the subscription to both publishers.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let attack = length_attack(len);
            assert_eq!(attack.len(), 111);
            attacker.w.write_all(&attack).await.expect("attack sent");
            attacker.w.flush().await.expect("flush");
            tokio::time::sleep(Duration::from_millis(100)).await;
            let frames: [&[u8]; 4] = [b"\"T/ok\"", b"\"honest\"", b"[1,2,3]", b"1.5"];
            honest.send(&frames).await;

            // The subscriber's first item is the honest message, whole.
            let item = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    if let Some(item) = sub.reader.next_item().expect("in sync") {
                        return item;
                    }
                    assert!(sub.reader.fill(&mut sub.r).await.expect("read"), "closed");
                }
            })
            .await
            .expect("the honest message arrives");
            match item {
                Inbound::Message(m) => {
                    let got: Vec<&[u8]> = m.frames().collect();
                    assert_eq!(got, frames.to_vec(), "len {len:#x}: intact, nothing glued");
                }
                other => panic!("len {len:#x}: {other:?}"),
            }
            // And nothing else: no byte of the attack follows.
            honest
                .send(&[b"\"T/end\"".as_slice(), b"\"honest\"", b"0", b"2.0"])
                .await;
            let next = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    if let Some(item) = sub.reader.next_item().expect("in sync") {
                        return item;
                    }
                    assert!(sub.reader.fill(&mut sub.r).await.expect("read"), "closed");
                }
            })
            .await
            .expect("the next honest message arrives");
            match next {
                Inbound::Message(m) => assert_eq!(m.first_frame(), b"\"T/end\""),
                other => panic!("{other:?}"),
            }
            let s = proxy.stats.snapshot();
            assert!(
                s.publishers.protocol_errors >= 1,
                "the attacker was cut off: {s:?}"
            );
            proxy.shutdown().await;
        }
    })
    .await
    .expect("test timed out");
}
