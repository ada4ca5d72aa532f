//! Bounded waiting: the one polling helper every test uses.

use std::time::Duration;

/// Upper bound of a whole test unless the file states its own.
pub const TEST_LIMIT: Duration = Duration::from_secs(60);

/// Polls `cond` every 10 ms until it holds or `limit` passes; true when
/// it held (it is asked once more at the deadline).
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}
