//! Our `Waker`: waking a task only queues its id (once) on the reactor's
//! ready list; a wake from another thread also pokes the `mio::Waker` so the
//! poll returns. Nothing is ever polled from inside `wake`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Wake, Waker};
use std::thread::ThreadId;

/// A pollable unit: a connection (`slot == None`) or one of its streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TaskId {
    pub conn: usize,
    pub slot: Option<usize>,
}

/// Ids of tasks to poll, filled by wakers.
pub struct ReadyQueue {
    ids: Mutex<Vec<TaskId>>,
    poll_waker: mio::Waker,
    reactor: ThreadId,
}

impl ReadyQueue {
    pub fn new(poll_waker: mio::Waker) -> Arc<Self> {
        Arc::new(ReadyQueue {
            ids: Mutex::new(Vec::new()),
            poll_waker,
            reactor: std::thread::current().id(),
        })
    }

    fn push(&self, id: TaskId) {
        if let Ok(mut ids) = self.ids.lock() {
            ids.push(id);
        }
        if std::thread::current().id() != self.reactor {
            let _ = self.poll_waker.wake();
        }
    }

    /// Takes every queued id.
    pub fn take(&self, into: &mut Vec<TaskId>) {
        if let Ok(mut ids) = self.ids.lock() {
            into.append(&mut ids);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ids.lock().map_or(true, |ids| ids.is_empty())
    }

    /// Wakes the poll from any thread (storage replies use this).
    pub fn wake_poll(&self) {
        let _ = self.poll_waker.wake();
    }
}

/// The waker of one task.
pub struct TaskWaker {
    id: TaskId,
    queued: AtomicBool,
    queue: Arc<ReadyQueue>,
}

impl TaskWaker {
    pub fn new(id: TaskId, queue: Arc<ReadyQueue>) -> (Arc<TaskWaker>, Waker) {
        let tw = Arc::new(TaskWaker {
            id,
            queued: AtomicBool::new(false),
            queue,
        });
        let waker = Waker::from(tw.clone());
        (tw, waker)
    }

    /// Called just before the task is polled: later wakes queue it again.
    pub fn clear(&self) {
        self.queued.store(false, Ordering::Release);
    }

    pub fn schedule(&self) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.queue.push(self.id);
        }
    }
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.schedule();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.schedule();
    }
}
