//! An echo endpoint: registers a name and answers every message with its
//! body, to the sender. Run a bus first (`hermes-bus server`), then:
//!
//! ```sh
//! cargo run --example echo -- echo
//! hermes-bus send echo '{"text": "ping"}' --from me   # 'me' gets {"echo": {...}}
//! ```

use hermes_bus::config::Paths;
use hermes_bus::transports::unix::{BusClient, ClientEvent};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let name = std::env::args().nth(1).unwrap_or_else(|| "echo".to_owned());
    let socket = Paths::resolve(None, None).socket;
    let mut client = BusClient::connect(&name, &socket).await?;
    eprintln!("registered as '{name}' on {}", socket.display());
    let mut events = client.events();
    tokio::spawn(async move {
        while let Ok(ev) = events.recv().await {
            if let ClientEvent::Disconnected { reason } = ev {
                eprintln!("disconnected: {reason} (reconnecting)");
            }
        }
    });
    while let Some(msg) = client.recv().await {
        let Some(from) = msg["from"].as_str().filter(|f| *f != name) else {
            continue;
        };
        client.send(from, json!({"echo": msg["body"]})).await?;
    }
    Ok(())
}
