//! The logs of a node's running parts: each part's book ([`LogBook`]) while it runs. Every
//! [`SHIP`] the node's loop gives the group's broker the lines written since
//! ([`NodeRequest::Logs`]); a part's last lines go in its report, and a part stopped (its job
//! failed or was cancelled elsewhere) ships what it still held.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mvm_component::runtime::logs::{LogBook, LogLine};
use parking_lot::Mutex;

use super::Node;
use crate::proto::{FailureKind, JobId, NodeRequest, Request};

/// How often a node ships its parts' new lines to the broker.
pub(super) const SHIP: Duration = Duration::from_millis(500);

/// The books of the parts running here, by job and run.
#[derive(Default)]
pub(super) struct Shelf {
    books: Mutex<HashMap<(JobId, u32), Arc<LogBook>>>,
    /// A shipment is under way (the next waits for it).
    shipping: AtomicBool,
}

impl Shelf {
    /// Keeps the book of run `attempt` of `job`'s part.
    pub(super) fn put(&self, job: JobId, attempt: u32, book: Arc<LogBook>) {
        self.books.lock().insert((job, attempt), book);
    }

    /// The last lines of run `attempt` of `job`'s part, its book taken off the shelf (none if
    /// it was taken already).
    pub(super) fn last(&self, job: &JobId, attempt: u32) -> Vec<LogLine> {
        let book = self.books.lock().remove(&(job.clone(), attempt));
        book.map(|b| {
            b.finish();
            b.take()
        })
        .unwrap_or_default()
    }

    /// Every book's new lines, by job and run.
    fn take(&self) -> Vec<(JobId, u32, Vec<LogLine>)> {
        let books: Vec<_> = (self.books.lock().iter())
            .map(|((j, a), b)| (j.clone(), *a, b.clone()))
            .collect();
        books
            .into_iter()
            .filter_map(|(j, a, b)| {
                let lines = b.take();
                (!lines.is_empty()).then_some((j, a, lines))
            })
            .collect()
    }

    /// Gives lines back to their part's book, if it is still here (a shipment failed).
    fn give_back(&self, job: &JobId, attempt: u32, lines: Vec<LogLine>) -> bool {
        let book = self.books.lock().get(&(job.clone(), attempt)).cloned();
        match book {
            Some(b) => {
                b.extend(lines);
                true
            }
            None => false,
        }
    }
}

impl Node {
    /// Ships every part's new lines, unless a shipment is under way; a shipment that fails
    /// gives its lines back, to go with the next.
    pub(super) async fn ship_logs(self: Arc<Self>) {
        if self.logs.shipping.swap(true, Ordering::AcqRel) {
            return;
        }
        for (job, attempt, lines) in self.logs.take() {
            self.ship(job, attempt, lines).await;
        }
        self.logs.shipping.store(false, Ordering::Release);
    }

    /// Ships `lines` of run `attempt` of `job` to the broker this node follows.
    pub(super) async fn ship(&self, job: JobId, attempt: u32, lines: Vec<LogLine>) {
        let Some((to, addrs)) = self.superpeer() else {
            // No super-peer yet (one is being elected): the lines wait in their book.
            self.logs.give_back(&job, attempt, lines);
            return;
        };
        let request = Request::Node(NodeRequest::Logs {
            job: job.clone(),
            attempt,
            lines,
        });
        match self.site.call(to, &addrs, request.clone()).await {
            Ok(_) => {}
            // The broker is away (or no longer leads): the lines go with the next shipment.
            Err(f) if f.kind == FailureKind::Unavailable => {
                let Request::Node(NodeRequest::Logs { lines, .. }) = request else {
                    return;
                };
                let n = lines.len();
                if !self.logs.give_back(&job, attempt, lines) {
                    tracing::warn!(%job, attempt, lines = n, error = %f, "log lines lost");
                }
            }
            Err(f) => tracing::warn!(%job, attempt, error = %f, "log lines refused"),
        }
    }
}
