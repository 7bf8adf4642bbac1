//! One connection's side of the certificate exchange: it opens one [`HELLO_PROTOCOL`] stream
//! and sends this daemon's [`Hello`] on it, then reads the peer's [`Verdict`]; it takes the
//! peer's one `Hello` stream (reading at most [`MAX_HELLO`] bytes), hands the certificate to
//! the behaviour, and writes back the behaviour's verdict. All I/O, no decisions.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{AsyncReadExt, AsyncWriteExt, FutureExt};
use libp2p::StreamProtocol;
use libp2p::core::upgrade::ReadyUpgrade;
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
};
use libp2p::swarm::{
    ConnectionHandler, ConnectionHandlerEvent, Stream, StreamUpgradeError, SubstreamProtocol,
};

use crate::proto::{HELLO_PROTOCOL, Hello, MAX_HELLO, Verdict, read_frame, write_frame};

/// How long a refused peer has to read its verdict before its connection is closed.
const GRACE: Duration = Duration::from_secs(2);

/// What the handler tells the behaviour.
#[derive(Debug)]
pub(crate) enum ToBehaviour {
    /// The peer's certificate, to be judged (answer with a [`Verdict`]).
    Cert(Bytes),
    /// The peer took this daemon's certificate.
    Taken,
    /// The exchange failed on this connection; `fatal` when trying again would not help (a
    /// refusal, a peer too slow or speaking another protocol), not when the connection broke.
    Failed {
        /// Why.
        reason: String,
        /// Whether a new connection would fare the same.
        fatal: bool,
    },
}

/// A future of the handler's I/O; its error says why, and whether it is fatal.
type Io<T> = BoxFuture<'static, Result<T, (String, bool)>>;

/// A failure of `what`: fatal when the peer sent something wrong (a frame over the bound, not
/// the expected message), not when the stream broke.
fn failed(what: &str, e: &std::io::Error) -> (String, bool) {
    let fatal = e.kind() == std::io::ErrorKind::InvalidData;
    (format!("{what}: {e}"), fatal)
}

/// The exchange on one connection.
pub(crate) struct Handler {
    /// This daemon's certificate.
    cert: Bytes,
    /// How long the whole exchange may take.
    deadline: Duration,
    /// When it ends; `None` once the exchange is over (either way).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether the outbound stream has been asked for.
    requested: bool,
    /// Whether the peer's `Hello` stream has come.
    taken: bool,
    /// Sending the `Hello`, reading the peer's verdict.
    outbound: Option<Io<Verdict>>,
    /// Reading the peer's `Hello`.
    inbound: Option<Io<(Hello, Stream)>>,
    /// The peer's stream while its certificate is judged.
    held: Option<Stream>,
    /// Writing the verdict on the peer's certificate; the refusal it carries, if any.
    answering: Option<(Io<()>, Option<String>)>,
    /// The peer's certificate passed, and the peer took this daemon's.
    passed: (bool, bool),
    /// What to tell the behaviour, in order.
    events: VecDeque<ToBehaviour>,
}

impl Handler {
    /// A handler that sends `cert` and gives up after `deadline`.
    pub(crate) fn new(cert: Bytes, deadline: Duration) -> Handler {
        Handler {
            cert,
            deadline,
            timer: Some(Box::pin(tokio::time::sleep(deadline))),
            requested: false,
            taken: false,
            outbound: None,
            inbound: None,
            held: None,
            answering: None,
            passed: (false, false),
            events: VecDeque::new(),
        }
    }

    /// Ends the exchange with a failure (once).
    fn fail(&mut self, reason: String, fatal: bool) {
        if self.timer.take().is_some() {
            self.events.push_back(ToBehaviour::Failed { reason, fatal });
        }
        self.outbound = None;
        self.inbound = None;
        self.held = None;
    }

    /// Ends the exchange once it has passed both ways.
    fn check_passed(&mut self) {
        if self.passed == (true, true) {
            self.timer = None;
        }
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Verdict;
    type ToBehaviour = ToBehaviour;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(ReadyUpgrade::new(HELLO_PROTOCOL), ()).with_timeout(self.deadline)
    }

    fn connection_keep_alive(&self) -> bool {
        // Open while the exchange runs; after that, as the other protocols need it.
        self.timer.is_some()
    }

    fn on_behaviour_event(&mut self, verdict: Verdict) {
        let Some(mut stream) = self.held.take() else {
            return;
        };
        let refusal = match &verdict {
            Verdict::Passed => {
                self.passed.0 = true;
                self.check_passed();
                None
            }
            Verdict::Refused(why) => Some(why.clone()),
        };
        let refused = refusal.is_some();
        let write = async move {
            write_frame(&mut stream, &verdict, MAX_HELLO)
                .await
                .map_err(|e| failed("answering its Hello", &e))?;
            let closed = stream.close().await;
            closed.map_err(|e| failed("answering its Hello", &e))?;
            if refused {
                // Closed once the peer has read why (it then drops its stream), or after a
                // moment: a peer that keeps its stream open gets one byte read, no more.
                let mut byte = [0u8; 1];
                let _ = tokio::time::timeout(GRACE, stream.read(&mut byte)).await;
            }
            Ok(())
        };
        self.answering = Some((write.boxed(), refusal));
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<'_, Self::InboundProtocol, Self::OutboundProtocol>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: mut stream,
                ..
            }) => {
                // One `Hello` per connection: a second stream is dropped unread.
                if std::mem::replace(&mut self.taken, true) || self.timer.is_none() {
                    return;
                }
                let read = async move {
                    let hello: Hello = read_frame(&mut stream, MAX_HELLO)
                        .await
                        .map_err(|e| failed("its Hello", &e))?;
                    hello
                        .validate()
                        .map_err(|e| (format!("its Hello: {e}"), true))?;
                    Ok((hello, stream))
                };
                self.inbound = Some(read.boxed());
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: mut stream,
                ..
            }) => {
                let hello = Hello {
                    cert: self.cert.clone(),
                };
                let exchange = async move {
                    write_frame(&mut stream, &hello, MAX_HELLO)
                        .await
                        .map_err(|e| failed("sending the Hello", &e))?;
                    let verdict: Verdict = read_frame(&mut stream, MAX_HELLO)
                        .await
                        .map_err(|e| failed("its verdict", &e))?;
                    let valid = verdict.validate();
                    valid.map_err(|e| (format!("its verdict: {e}"), true))?;
                    Ok(verdict)
                };
                self.outbound = Some(exchange.boxed());
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError { error, .. }) => {
                let (reason, fatal) = match error {
                    StreamUpgradeError::NegotiationFailed => {
                        (format!("it does not speak {HELLO_PROTOCOL}"), true)
                    }
                    StreamUpgradeError::Timeout => ("its Hello stream did not open".into(), true),
                    StreamUpgradeError::Io(e) => (format!("the Hello stream: {e}"), false),
                    StreamUpgradeError::Apply(e) => libp2p::core::util::unreachable(e),
                };
                self.fail(reason, fatal);
            }
            _ => {}
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Self::ToBehaviour>> {
        if let Some(e) = self.events.pop_front() {
            return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(e));
        }
        if !std::mem::replace(&mut self.requested, true) {
            let protocol = SubstreamProtocol::new(ReadyUpgrade::new(HELLO_PROTOCOL), ())
                .with_timeout(self.deadline);
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest { protocol });
        }
        if let Some(f) = self.outbound.as_mut()
            && let Poll::Ready(r) = f.poll_unpin(cx)
        {
            self.outbound = None;
            match r {
                Ok(Verdict::Passed) => {
                    self.passed.1 = true;
                    self.check_passed();
                    self.events.push_back(ToBehaviour::Taken);
                }
                Ok(Verdict::Refused(why)) => self.fail(why, true),
                Err((e, fatal)) => self.fail(e, fatal),
            }
        }
        if let Some(f) = self.inbound.as_mut()
            && let Poll::Ready(r) = f.poll_unpin(cx)
        {
            self.inbound = None;
            match r {
                Ok((hello, stream)) => {
                    self.held = Some(stream);
                    self.events.push_back(ToBehaviour::Cert(hello.cert));
                }
                // A frame over the bound, or not a `Hello`: nothing more is read from it.
                Err((e, fatal)) => self.fail(e, fatal),
            }
        }
        if let Some((f, _)) = self.answering.as_mut()
            && let Poll::Ready(r) = f.poll_unpin(cx)
        {
            let refusal = self.answering.take().and_then(|(_, why)| why);
            match (r, refusal) {
                // Refused: closed once the peer has been told why.
                (_, Some(why)) => self.fail(why, true),
                (Err((e, fatal)), None) => self.fail(e, fatal),
                (Ok(()), None) => {}
            }
        }
        if let Some(t) = self.timer.as_mut()
            && t.as_mut().poll(cx).is_ready()
        {
            let what = match self.passed {
                (false, _) if !self.taken => "it sent no certificate",
                (false, _) => "its certificate was not judged",
                (true, _) => "it did not answer this daemon's certificate",
            };
            let secs = self.deadline.as_secs_f64();
            self.fail(format!("{what} within {secs} s"), true);
        }
        match self.events.pop_front() {
            Some(e) => Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(e)),
            None => Poll::Pending,
        }
    }
}
