//! Guests that die behind the node's back (SmartDomains' liveness monitor, run by the node for
//! every guest a job holds): the part in the guest fails at once, not at its wall limit, and
//! its broker is told as for any failed part (a job with checkpoints runs on elsewhere).

use std::sync::Arc;

use mvm_os::liveness::Died;
use tokio::sync::mpsc;

use super::parts::{Effect, Input, Parts, Stage};
use super::{Msg, Node};
use crate::proto::{ErrorKind, PartReport, VertexFailure};

impl Node {
    /// Hands every death the monitor reports to the node's loop, until the monitor stops.
    pub(crate) async fn watch_guests(self: Arc<Self>, mut deaths: mpsc::Receiver<Died>) {
        while let Some(d) = deaths.recv().await {
            let why = match d.last {
                None => "it vanished".to_owned(),
                Some(state) => format!("it was {state:?}"),
            };
            tracing::warn!(guest = %d.name, %why, cleanup = ?d.cleanup, "a guest died behind the node's back");
            let input = Input::GuestDied { guest: d.name, why };
            if self.inputs.send(Msg::Input(input)).await.is_err() {
                return;
            }
        }
    }
}

impl Parts {
    /// The part running in guest `guest`, if any, fails: its guest died, `why`.
    pub(super) fn guest_died(&mut self, out: &mut Vec<Effect>, guest: &str, why: String) {
        let found = self.parts.iter().find(|(_, p)| {
            matches!(p.stage, Stage::Running { .. })
                && p._env.as_ref().is_some_and(|e| e.guest().name() == guest)
        });
        let Some((job, part)) = found else {
            return;
        };
        let report = PartReport {
            job: job.clone(),
            attempt: part.attempt,
            outcome: Err(VertexFailure {
                vertex: String::new(),
                cause: format!("its guest {guest} died behind the node's back: {why}"),
                kind: ErrorKind::Lost,
            }),
            logs: Vec::new(),
        };
        self.ended(out, report);
    }
}
