//! [`Disconnect`]: why a client's connection ended, and whether the client
//! should dial again.

use std::fmt;

/// Why a client's connection ended.
///
/// [`Disconnect::is_final`] tells the reconnect loop whether to dial
/// again: the client's own end (closed, stopped, dropped, a give-up policy)
/// is final, anything the peer or the network did is not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disconnect {
    /// The client itself went away (closed, stopped or dropped).
    Closed,
    /// The client gave up by its own policy (the receiver's `Stop` slow
    /// policy): it does not dial again.
    GaveUp(&'static str),
    /// The bus (or proxy) closed the connection.
    PeerClosed,
    /// Reading or writing the socket failed.
    Io {
        /// The error's kind.
        kind: std::io::ErrorKind,
        /// The error as text.
        message: String,
    },
    /// The peer sent something the protocol does not allow, so the stream
    /// cannot stay in sync.
    Protocol(String),
    /// A task of the client failed (it panicked).
    TaskFailed(String),
    /// The peer went silent: nothing arrived within the heartbeat timeout
    /// (a dead host or a cut link leaves the TCP connection half open).
    Silent(String),
}

impl Disconnect {
    /// True when the client ended the connection itself: no reconnect.
    pub fn is_final(&self) -> bool {
        matches!(self, Disconnect::Closed | Disconnect::GaveUp(_))
    }
}

impl From<std::io::Error> for Disconnect {
    fn from(e: std::io::Error) -> Disconnect {
        Disconnect::Io {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

impl fmt::Display for Disconnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disconnect::Closed => f.write_str("closed"),
            Disconnect::GaveUp(why) => write!(f, "gave up: {why}"),
            Disconnect::PeerClosed => f.write_str("bus closed the connection"),
            Disconnect::Io { message, .. } => f.write_str(message),
            Disconnect::Protocol(m) => f.write_str(m),
            Disconnect::TaskFailed(m) => write!(f, "reader failed: {m}"),
            Disconnect::Silent(m) => f.write_str(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_clients_own_end_is_final() {
        assert!(Disconnect::Closed.is_final());
        assert!(Disconnect::GaveUp("lagging").is_final());
        for d in [
            Disconnect::PeerClosed,
            std::io::Error::from(std::io::ErrorKind::BrokenPipe).into(),
            Disconnect::Protocol("bad frame".into()),
            Disconnect::TaskFailed("panic".into()),
            Disconnect::Silent("peer silent".into()),
        ] {
            assert!(!d.is_final(), "{d:?}");
        }
    }

    #[test]
    fn texts_are_the_ones_events_always_carried() {
        let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "broken pipe");
        assert_eq!(Disconnect::from(io).to_string(), "broken pipe");
        assert_eq!(
            Disconnect::PeerClosed.to_string(),
            "bus closed the connection"
        );
        assert_eq!(Disconnect::Closed.to_string(), "closed");
        assert_eq!(
            Disconnect::TaskFailed("x".into()).to_string(),
            "reader failed: x"
        );
    }
}
