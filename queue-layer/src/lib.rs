//! The MVM queue layer: how every node communicates.
//!
//! Data and instructions move between jobs through virtual queues whose kind (FIFO or
//! priority), management policy (capacity, overflow) and encoding (a named codec) are chosen at
//! run time. A node's [`Controller`] creates and limits them; a queue extends over any async
//! byte stream with credit-based flow control ([`remote`]), and several consumers, local or on
//! other nodes, can share one queue ([`remote::share`]): the single system image of the MVM paper.
//!
//! ```
//! use mvm_queue::queue::{Config, Queue};
//!
//! let q: Queue<Vec<u8>> = Queue::new("demo", Config::fifo(16))?;
//! let (tx, rx) = (q.sender(), q.receiver());
//! tx.send(b"hello".to_vec())?;
//! drop(tx); // the last sender closes the queue
//! assert_eq!(rx.recv()?, b"hello");
//! assert!(rx.recv().is_err()); // end of stream
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Glossary: an *item* is one message; an *entry* is an item with its priority; a *codec* turns
//! values into items and back; *credit* is how many items and bytes a remote receiver still has
//! room for; a *mark* is where a checkpoint cuts a link, so that nothing is in flight
//! ([`remote::mark`]).

pub mod bench;
pub mod codec;
pub mod controller;
#[doc(hidden)]
pub mod fuzz;
pub mod queue;
pub mod remote;

pub use codec::{Codec, CodecError};
pub use controller::Controller;
pub use queue::{
    Config, Entry, Item, Queue, Receiver, RecvError, RecvFailure, SendError, SendFailure, Sender,
    Stats,
};
