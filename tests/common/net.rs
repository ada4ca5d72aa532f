//! Loopback addresses for tests.

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe port");
    l.local_addr().expect("addr").port()
}

/// `tcp://127.0.0.1:PORT` on a [`free_port`]: where nothing listens (yet).
pub fn free_tcp_addr() -> String {
    format!("tcp://127.0.0.1:{}", free_port())
}
