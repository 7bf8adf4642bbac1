//! A client's steering of running jobs and of the group: checkpoints, migrations, drains,
//! bids, holds, and policy reloads.

use super::{Client, unexpected};
use crate::proto::{ClientRequest, Failure, FailureKind, Hash, JobId, Request, Response};

impl Client {
    /// Takes a checkpoint of a running job now; returns once it is stored and recorded.
    ///
    /// # Errors
    /// No such job, a job that did not ask for checkpoints or is not running, a checkpoint
    /// given up (a vertex that reached no pause point in time, a node that failed), or the
    /// broker's refusal.
    pub async fn checkpoint(&self, job: &JobId) -> Result<(), Failure> {
        match self
            .call(ClientRequest::Checkpoint { job: job.clone() })
            .await?
        {
            Response::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Moves the part of a running job that runs `vertex` (or that runs on node `node`) to
    /// the node named `to`, while the job runs; the move, once recorded.
    ///
    /// # Errors
    /// No such job, part or node, a job that did not ask for checkpoints or is not running, a
    /// node without room, a move that failed (the job goes on where it was, or, if the links
    /// had begun to change, runs again from its newest checkpoint), or the broker's refusal.
    pub async fn migrate(
        &self,
        job: &JobId,
        vertex: Option<String>,
        node: Option<String>,
        to: &str,
    ) -> Result<Vec<crate::proto::MoveInfo>, Failure> {
        match self
            .call(ClientRequest::Migrate {
                job: job.clone(),
                vertex,
                node,
                to: to.to_owned(),
            })
            .await?
        {
            Response::Moved(v) => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    /// Drains the node named `node` (`drain`: nothing more is placed on it, and the parts of
    /// jobs that asked for checkpoints move off it), or makes it placeable again; the parts
    /// moved.
    ///
    /// # Errors
    /// No such node, parts that could not move, or the policy's refusal (draining is for who
    /// may `administer` the domain).
    pub async fn drain(
        &self,
        node: &str,
        drain: bool,
    ) -> Result<Vec<crate::proto::MoveInfo>, Failure> {
        match self
            .call(ClientRequest::Drain {
                node: node.to_owned(),
                drain,
            })
            .await?
        {
            Response::Moved(v) => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    /// Changes a bidding job's bid to `rate` micro-credits per CPU-second.
    ///
    /// # Errors
    /// No such job, it does not bid or has ended, the rate is out of range or above its
    /// owner's balance, the policy refuses `bid`, or the broker cannot be reached.
    pub async fn bid(&self, job: &JobId, rate: u64) -> Result<(), Failure> {
        match self
            .call(ClientRequest::Bid {
                job: job.clone(),
                rate,
            })
            .await?
        {
            Response::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Holds a pending job back from placement (`held`), or releases it.
    ///
    /// # Errors
    /// No such job, it is not pending, it is already so, the policy refuses (who may cancel a
    /// job may hold it), or the broker cannot be reached.
    pub async fn hold(&self, job: &JobId, held: bool) -> Result<(), Failure> {
        match self
            .call(ClientRequest::Hold {
                job: job.clone(),
                held,
            })
            .await?
        {
            Response::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Asks the super-peer holding the policies to read them again; the version and digest
    /// in force after.
    ///
    /// # Errors
    /// Refused (the user may not administer the domain), no policy directory there, or the
    /// changed files do not load (file and line; the old version stays).
    pub async fn reload_policies(&self) -> Result<(u64, Hash), Failure> {
        let (broker, addrs) = self.target();
        let reload = Request::Client(ClientRequest::PolicyReload);
        match self.net.call(broker, &addrs, reload).await? {
            Response::Policy {
                version, digest, ..
            } => Ok((version, digest)),
            _ => Err(Failure::new(FailureKind::Failed, "an unexpected answer")),
        }
    }
}
