//! The queue controller of one node: creates, finds, lists and destroys the queues of each job,
//! within the node's limits.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::codec::{Codec, CodecError, Registry};
use crate::queue::{Config, ConfigError, Kind, Queue, Stats};

/// Node-level queue limits, read from node policy. The defaults allow every kind and codec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "kebab-case")]
pub struct Limits {
    /// The most queues alive on the node at once, all jobs together.
    pub max_queues: usize,
    /// The largest capacity in items one queue may have.
    pub max_capacity: usize,
    /// The largest capacity in bytes one queue may have.
    pub max_capacity_bytes: u64,
    /// The largest single item, in bytes; queues with a larger limit are clamped to it.
    pub max_item_bytes: u64,
    /// The kinds allowed; empty means all.
    pub kinds: Vec<Kind>,
    /// The codec names allowed (whole chains, e.g. `zstd+cbor`); empty means all registered.
    pub codecs: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_queues: 100_000,
            max_capacity: 1 << 20,
            max_capacity_bytes: 1 << 30,
            max_item_bytes: 64 << 20,
            kinds: Vec::new(),
            codecs: Vec::new(),
        }
    }
}

/// A queue request the controller refused, naming the job and queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControllerError {
    /// The configuration is inconsistent.
    #[error("job '{job}', queue '{queue}': {source}")]
    Config {
        /// The job.
        job: String,
        /// The queue.
        queue: String,
        /// What is wrong.
        source: ConfigError,
    },
    /// The codec is unknown.
    #[error("job '{job}', queue '{queue}': {source}")]
    Codec {
        /// The job.
        job: String,
        /// The queue.
        queue: String,
        /// What is wrong.
        source: Box<CodecError>,
    },
    /// A queue of that name exists in the job.
    #[error("job '{job}': queue '{queue}' exists already")]
    Exists {
        /// The job.
        job: String,
        /// The queue.
        queue: String,
    },
    /// No queue of that name exists in the job.
    #[error("job '{job}': no queue named '{queue}'")]
    NotFound {
        /// The job.
        job: String,
        /// The queue.
        queue: String,
    },
    /// The node holds as many queues as its policy allows.
    #[error("job '{job}', queue '{queue}': the node's limit of {limit} queues is reached")]
    TooManyQueues {
        /// The job.
        job: String,
        /// The queue.
        queue: String,
        /// The node's limit.
        limit: usize,
    },
    /// A capacity is above the node's limit.
    #[error("job '{job}', queue '{queue}': {what} {asked} is above the node's limit of {limit}")]
    OverLimit {
        /// The job.
        job: String,
        /// The queue.
        queue: String,
        /// Which setting ("capacity", "capacity-bytes").
        what: &'static str,
        /// What was asked.
        asked: u64,
        /// The node's limit.
        limit: u64,
    },
    /// The node's policy does not allow this kind or codec.
    #[error("job '{job}', queue '{queue}': the node's policy does not allow {what} '{name}'")]
    NotAllowed {
        /// The job.
        job: String,
        /// The queue.
        queue: String,
        /// "queue kind" or "codec".
        what: &'static str,
        /// The refused name.
        name: String,
    },
}

/// A queue as the controller hands it out: the queue and its resolved codec.
#[derive(Debug, Clone)]
pub struct Handle {
    /// The queue.
    pub queue: Queue<Bytes>,
    /// Its codec.
    pub codec: Codec,
}

/// The queue controller of one node.
#[derive(Debug)]
pub struct Controller {
    limits: Limits,
    codecs: Arc<Registry>,
    queues: Mutex<BTreeMap<(String, String), Handle>>,
}

impl Controller {
    /// A controller with the given limits and codec registry.
    pub fn new(limits: Limits, codecs: Arc<Registry>) -> Controller {
        Controller {
            limits,
            codecs,
            queues: Mutex::new(BTreeMap::new()),
        }
    }

    /// The node's limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The node's codec registry.
    pub fn codecs(&self) -> &Arc<Registry> {
        &self.codecs
    }

    /// Checks a configuration against the node's limits and codecs without creating anything,
    /// returning it as it would be used (the item limit clamped to the node's).
    ///
    /// # Errors
    /// The first reason the node would refuse it.
    pub fn check(
        &self,
        job: &str,
        queue: &str,
        config: &Config,
    ) -> Result<(Config, Codec), ControllerError> {
        let ctx = || (job.to_owned(), queue.to_owned());
        config.validate().map_err(|source| {
            let (job, queue) = ctx();
            ControllerError::Config { job, queue, source }
        })?;
        let codec = self.codecs.resolve(&config.codec).map_err(|source| {
            let (job, queue) = ctx();
            ControllerError::Codec {
                job,
                queue,
                source: Box::new(source),
            }
        })?;
        let l = &self.limits;
        if !l.kinds.is_empty() && !l.kinds.contains(&config.kind) {
            let (job, queue) = ctx();
            let name = config.kind.to_string();
            return Err(ControllerError::NotAllowed {
                job,
                queue,
                what: "queue kind",
                name,
            });
        }
        if !l.codecs.is_empty() && !l.codecs.iter().any(|c| c == codec.name()) {
            let (job, queue) = ctx();
            let name = codec.name().to_owned();
            return Err(ControllerError::NotAllowed {
                job,
                queue,
                what: "codec",
                name,
            });
        }
        if config.capacity > l.max_capacity {
            let (job, queue) = ctx();
            let (asked, limit) = (config.capacity as u64, l.max_capacity as u64);
            return Err(ControllerError::OverLimit {
                job,
                queue,
                what: "capacity",
                asked,
                limit,
            });
        }
        if config.capacity_bytes > l.max_capacity_bytes {
            let (job, queue) = ctx();
            let (asked, limit) = (config.capacity_bytes, l.max_capacity_bytes);
            return Err(ControllerError::OverLimit {
                job,
                queue,
                what: "capacity-bytes",
                asked,
                limit,
            });
        }
        let mut config = config.clone();
        config.max_item_bytes = Some(config.item_limit().min(l.max_item_bytes));
        Ok((config, codec))
    }

    /// Creates queue `queue` of job `job`.
    ///
    /// # Errors
    /// The configuration is refused (see [`Controller::check`]), the name is taken in the job,
    /// or the node holds its maximum number of queues.
    pub fn create(
        &self,
        job: &str,
        queue: &str,
        config: &Config,
    ) -> Result<Handle, ControllerError> {
        let (config, codec) = self.check(job, queue, config)?;
        let mut queues = self.queues.lock();
        let key = (job.to_owned(), queue.to_owned());
        if queues.contains_key(&key) {
            return Err(ControllerError::Exists {
                job: key.0,
                queue: key.1,
            });
        }
        if queues.len() >= self.limits.max_queues {
            let limit = self.limits.max_queues;
            return Err(ControllerError::TooManyQueues {
                job: key.0,
                queue: key.1,
                limit,
            });
        }
        let full_name = format!("{job}/{queue}");
        let q = Queue::new(full_name, config).map_err(|source| ControllerError::Config {
            job: job.to_owned(),
            queue: queue.to_owned(),
            source,
        })?;
        let handle = Handle { queue: q, codec };
        queues.insert(key, handle.clone());
        Ok(handle)
    }

    /// Finds queue `queue` of job `job`.
    pub fn get(&self, job: &str, queue: &str) -> Option<Handle> {
        self.queues
            .lock()
            .get(&(job.to_owned(), queue.to_owned()))
            .cloned()
    }

    /// The stats of every queue of `job`, or of every queue when `job` is `None`.
    pub fn list(&self, job: Option<&str>) -> Vec<Stats> {
        self.queues
            .lock()
            .iter()
            .filter(|((j, _), _)| job.is_none_or(|job| j == job))
            .map(|(_, h)| h.queue.stats())
            .collect()
    }

    /// How many queues are alive.
    pub fn len(&self) -> usize {
        self.queues.lock().len()
    }

    /// Whether no queue is alive.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Destroys queue `queue` of job `job`: closes it and discards what it holds. The returned
    /// stats say how many items were discarded (`depth`), so nothing vanishes unaccounted.
    ///
    /// # Errors
    /// [`ControllerError::NotFound`].
    pub fn destroy(&self, job: &str, queue: &str) -> Result<Stats, ControllerError> {
        let handle = self
            .queues
            .lock()
            .remove(&(job.to_owned(), queue.to_owned()))
            .ok_or_else(|| ControllerError::NotFound {
                job: job.to_owned(),
                queue: queue.to_owned(),
            })?;
        Ok(retire(&handle.queue))
    }

    /// Destroys every queue of `job`, returning their final stats.
    pub fn destroy_job(&self, job: &str) -> Vec<Stats> {
        let removed: Vec<Handle> = {
            let mut queues = self.queues.lock();
            let keys: Vec<_> = queues.keys().filter(|(j, _)| j == job).cloned().collect();
            keys.into_iter().filter_map(|k| queues.remove(&k)).collect()
        };
        removed.iter().map(|h| retire(&h.queue)).collect()
    }
}

fn retire(queue: &Queue<Bytes>) -> Stats {
    queue.close();
    let stats = queue.stats();
    let discarded = queue.drain().len();
    if discarded > 0 {
        tracing::warn!(queue = %queue.name(), discarded, "queue destroyed with items left in it");
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller(limits: Limits) -> Controller {
        Controller::new(limits, Arc::new(Registry::new()))
    }

    #[test]
    fn creates_finds_lists_and_destroys_per_job() {
        let c = controller(Limits::default());
        let h = c.create("j1", "a", &Config::fifo(4)).expect("created");
        c.create("j1", "b", &Config::priority(4)).expect("created");
        c.create("j2", "a", &Config::fifo(4))
            .expect("same name, other job");
        assert!(matches!(
            c.create("j1", "a", &Config::fifo(4)),
            Err(ControllerError::Exists { .. })
        ));
        assert!(c.get("j1", "a").is_some());
        assert!(c.get("j1", "zz").is_none());
        assert_eq!(c.list(Some("j1")).len(), 2);
        assert_eq!(c.list(None).len(), 3);

        let tx = h.queue.sender();
        tx.send(Bytes::from_static(b"x")).expect("room");
        let stats = c.destroy("j1", "a").expect("exists");
        assert_eq!(stats.depth, 1, "the discarded item is accounted");
        assert!(h.queue.is_closed());
        assert!(matches!(
            c.destroy("j1", "a"),
            Err(ControllerError::NotFound { .. })
        ));
        assert_eq!(c.destroy_job("j1").len(), 1);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn node_limits_are_enforced_with_names() {
        let limits = Limits {
            max_queues: 2,
            max_capacity: 10,
            max_capacity_bytes: 1000,
            max_item_bytes: 100,
            kinds: vec![Kind::Fifo],
            codecs: vec!["cbor".into(), "raw".into()],
        };
        let c = controller(limits);
        let e = c
            .create("j", "big", &Config::fifo(11))
            .expect_err("over capacity");
        assert!(
            e.to_string()
                .contains("capacity 11 is above the node's limit of 10"),
            "{e}"
        );
        let cfg = Config {
            capacity_bytes: 2000,
            ..Config::fifo(4)
        };
        assert!(matches!(
            c.create("j", "b", &cfg),
            Err(ControllerError::OverLimit {
                what: "capacity-bytes",
                ..
            })
        ));
        let e = c.create("j", "p", &Config::priority(4)).expect_err("kind");
        assert!(e.to_string().contains("queue kind 'priority'"), "{e}");
        let cfg = Config {
            codec: "json".into(),
            ..Config::fifo(4)
        };
        assert!(matches!(
            c.create("j", "c", &cfg),
            Err(ControllerError::NotAllowed { what: "codec", .. })
        ));
        let cfg = Config {
            codec: "nope".into(),
            ..Config::fifo(4)
        };
        assert!(matches!(
            c.create("j", "c", &cfg),
            Err(ControllerError::Codec { .. })
        ));

        let cfg = Config {
            capacity_bytes: 1000,
            ..Config::fifo(4)
        };
        let h = c.create("j", "q1", &cfg).expect("within limits");
        assert_eq!(
            h.queue.config().max_item_bytes,
            Some(100),
            "item limit clamped to the node's"
        );
        let tx = h.queue.sender();
        let _rx = h.queue.receiver();
        let e = tx.send(Bytes::from(vec![0; 101])).expect_err("too large");
        assert!(matches!(
            e.failure,
            crate::SendFailure::TooLarge {
                size: 101,
                limit: 100
            }
        ));
        c.create("j", "q2", &cfg).expect("second queue");
        let e = c.create("j", "q3", &cfg).expect_err("third queue");
        assert!(matches!(e, ControllerError::TooManyQueues { limit: 2, .. }));
    }
}
