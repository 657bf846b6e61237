//! Per-connection log files: NSS key logs (for Wireshark) and qlogs.
//!
//! A log that cannot be opened or written never affects the connection:
//! the failure is kept here and reported once by the next poll, which
//! Elixir turns into a telemetry event.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::{ConfigResource, QlogLevel};

/// A log file whose write errors are remembered instead of returned.
struct Logged {
    file: File,
    failed: Arc<AtomicBool>,
}

impl Write for Logged {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.failed.load(Ordering::Relaxed) {
            return Ok(buf.len());
        }
        match self.file.write(buf) {
            Ok(n) => Ok(n),
            Err(_) => {
                self.failed.store(true, Ordering::Relaxed);
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.file.flush().is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// The state of a connection's log files.
#[derive(Default)]
pub struct Logs {
    /// Set by a writer that failed.
    failed: Arc<AtomicBool>,
    /// Why a log could not be opened, until reported.
    open_error: Option<String>,
    /// A failure was reported already.
    reported: bool,
}

impl Logs {
    /// Sets up the key log and the qlog the config asks for.
    pub fn start(conn: &mut quiche::Connection, config: &ConfigResource) -> Logs {
        let mut logs = Logs::default();
        if let Some(path) = config.keylog() {
            match OpenOptions::new().create(true).append(true).open(path) {
                Ok(file) => conn.set_keylog(Box::new(logs.writer(file))),
                Err(e) => logs.open_error = Some(format!("keylog_file {path}: {e}")),
            }
        }
        if let Some((dir, level)) = config.qlog() {
            let name = format!("{}.sqlog", conn.trace_id());
            let path = Path::new(dir).join(name);
            match File::create(&path) {
                Ok(file) => {
                    let role = if conn.is_server() { "server" } else { "client" };
                    conn.set_qlog_with_level(
                        Box::new(logs.writer(file)),
                        format!("quichex {role} {}", conn.trace_id()),
                        "quichex connection".to_string(),
                        match level {
                            QlogLevel::Core => quiche::QlogLevel::Core,
                            QlogLevel::Base => quiche::QlogLevel::Base,
                            QlogLevel::Extra => quiche::QlogLevel::Extra,
                        },
                    );
                }
                Err(e) => logs.open_error = Some(format!("qlog {}: {e}", path.display())),
            }
        }
        logs
    }

    fn writer(&self, file: File) -> Logged {
        Logged {
            file,
            failed: Arc::clone(&self.failed),
        }
    }

    /// The first failure not reported yet: reported once per connection.
    pub fn take_failure(&mut self) -> Option<String> {
        if self.reported {
            return None;
        }
        let failure = self.open_error.take().or_else(|| {
            self.failed
                .load(Ordering::Relaxed)
                .then(|| "write failed".to_string())
        });
        self.reported = failure.is_some();
        failure
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_reported_once() {
        let mut logs = Logs {
            open_error: Some("qlog /nope: denied".into()),
            ..Logs::default()
        };
        assert_eq!(logs.take_failure().as_deref(), Some("qlog /nope: denied"));
        logs.failed.store(true, Ordering::Relaxed);
        assert_eq!(logs.take_failure(), None);
    }

    #[test]
    fn write_errors_are_swallowed_and_remembered() {
        let logs = Logs::default();
        // /dev/full fails every write.
        if let Ok(file) = OpenOptions::new().write(true).open("/dev/full") {
            let mut w = logs.writer(file);
            assert_eq!(w.write(b"x").ok(), Some(1));
            let _ = w.flush();
            assert!(logs.failed.load(Ordering::Relaxed));
        }
    }
}
