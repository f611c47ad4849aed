//! Watches whether the NATS cluster can serve: connected to a server, and
//! the stream answering its info request (a stream without a leader, e.g.
//! a cluster without quorum, does not). Checks once a second; a lost
//! connection counts at once, an unanswered stream after two checks in a
//! row (a leader election takes seconds). Writes `StoreStatus`; the writer
//! reports changes to the reactor. With retention on, it also reads the
//! stream's per-subject counts each time and hands them to the writer (off
//! the writer's thread: the request can be large). Calls `nats`.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::status::StoreStatus;
use crate::nats::jetstream::JetStream;

const INTERVAL: Duration = Duration::from_secs(1);

/// Messages per topic subject, and the stream's last sequence, at one moment.
#[derive(Debug, Clone, Default)]
pub struct SubjectCounts {
    pub last_seq: u64,
    pub subjects: std::collections::BTreeMap<String, u64>,
}

/// Where the per-subject counts go: (the subjects' filter, the writer's end).
pub type CountsFeed = (String, Sender<SubjectCounts>);

/// The running monitor; dropping `stop` (or `stop()`) ends it.
pub struct Monitor {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Monitor {
    pub fn spawn(
        js: JetStream,
        stream: String,
        status: Arc<StoreStatus>,
        counts: Option<CountsFeed>,
    ) -> std::io::Result<Monitor> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("sluice-nats-monitor".into())
            .spawn(move || run(&js, &stream, &status, counts.as_ref(), &stopped))?;
        Ok(Monitor {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    js: &JetStream,
    stream: &str,
    status: &StoreStatus,
    counts: Option<&CountsFeed>,
    stopped: &Receiver<()>,
) {
    let mut misses = 0u32;
    loop {
        let reason = if !js.client().is_connected() {
            misses = 0;
            Some("no connection to any NATS server".to_string())
        } else {
            match js.stream_info(stream) {
                Ok(_) => {
                    misses = 0;
                    None
                }
                Err(e) => {
                    misses += 1;
                    let why = format!("JetStream does not answer for stream {stream}: {e}");
                    if misses >= 2 {
                        Some(why)
                    } else {
                        status.unavailable_reason()
                    }
                }
            }
        };
        let reachable = reason.is_none();
        status.set_unavailable(reason);
        if let (true, Some((filter, feed))) = (reachable, counts) {
            match js.subject_counts(stream, filter, usize::MAX) {
                // A full feed means the writer has not taken the last one.
                Ok(c) => {
                    let _ = feed.try_send(SubjectCounts {
                        last_seq: c.stream.last_seq,
                        subjects: c.subjects,
                    });
                }
                Err(e) => crate::log_limited!(log::Level::Warn, "cannot check retention: {e}"),
            }
        }
        match stopped.recv_timeout(INTERVAL) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}
