//! The report server: one thread, beside the serve loop, that answers the control socket's
//! ([`crate::control`]) and the metrics endpoint's ([`crate::metrics`]) clients from the report
//! board ([`crate::report`]).
//!
//! Its clients are local but not trusted (anyone on the host can open a loopback TCP
//! connection): each one is non-blocking and multiplexed with `poll`, gets [`CLIENT_DEADLINE`]
//! from accept to the end of its reply, and at most [`MAX_CLIENTS`] are served at once (more
//! are closed at accept). A client that sends nothing, trickles bytes or never reads its reply
//! costs one slot for a second; the vhost-user loop never waits for it. Both cut-offs are
//! counted in the report (`daemon.report_clients_cut_off`, `daemon.report_clients_refused`).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::control::ControlSocket;
use crate::metrics::MetricsEndpoint;
use crate::report::Board;

/// How long a client has from accept to the end of its reply.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(1);
/// Clients served at once.
pub const MAX_CLIENTS: usize = 16;

/// Which endpoint a client came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    /// The control socket: one line, one JSON reply.
    Control,
    /// The metrics endpoint: an HTTP request line, one HTTP reply.
    Metrics,
}

impl Protocol {
    fn max_request(self) -> usize {
        match self {
            Protocol::Control => crate::control::MAX_REQUEST,
            Protocol::Metrics => crate::metrics::MAX_REQUEST,
        }
    }

    fn reply(self, line: &str, board: &Board) -> Vec<u8> {
        match self {
            Protocol::Control => crate::control::reply(line, || board.report()),
            Protocol::Metrics => crate::metrics::reply(line, || board.report()),
        }
    }
}

/// A client's connection.
#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
        };
    }
}

/// Where a client is in its one exchange.
#[derive(Debug)]
enum Phase {
    /// Reading its request line.
    Request(Vec<u8>),
    /// Writing the reply.
    Reply { out: Vec<u8>, sent: usize },
    /// Reply sent and the write side shut: reading what else it sent until it closes (so a
    /// TCP close with unread bytes does not reset the reply away).
    Drain,
}

/// What handling a readiness came to.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Waits for more readiness.
    Pending,
    /// Done (or failed): close it.
    Close,
}

#[derive(Debug)]
struct Client {
    stream: Stream,
    protocol: Protocol,
    phase: Phase,
    deadline: Instant,
}

impl Client {
    fn interest(&self) -> PollFlags {
        match self.phase {
            Phase::Request(_) | Phase::Drain => PollFlags::POLLIN,
            Phase::Reply { .. } => PollFlags::POLLOUT,
        }
    }

    /// Moves the exchange on as far as the socket lets it without blocking.
    fn advance(&mut self, board: &Board) -> Step {
        loop {
            match &mut self.phase {
                Phase::Request(buf) => {
                    let mut chunk = [0u8; 512];
                    match self.stream.read(&mut chunk) {
                        Ok(0) => return Step::Close,
                        Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Pending,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => return Step::Close,
                    }
                    let limit = self.protocol.max_request();
                    match buf.iter().position(|&b| b == b'\n') {
                        Some(end) if end <= limit => {
                            let line = String::from_utf8_lossy(buf.get(..end).unwrap_or_default())
                                .into_owned();
                            let out = self.protocol.reply(&line, board);
                            self.phase = Phase::Reply { out, sent: 0 };
                        }
                        Some(_) => return Step::Close,
                        None if buf.len() > limit => return Step::Close,
                        None => {}
                    }
                }
                Phase::Reply { out, sent } => {
                    let rest = out.get(*sent..).unwrap_or_default();
                    if rest.is_empty() {
                        self.stream.shutdown_write();
                        self.phase = Phase::Drain;
                        continue;
                    }
                    match self.stream.write(rest) {
                        Ok(0) => return Step::Close,
                        Ok(n) => *sent += n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Pending,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => return Step::Close,
                    }
                }
                Phase::Drain => {
                    let mut chunk = [0u8; 512];
                    match self.stream.read(&mut chunk) {
                        Ok(0) => return Step::Close,
                        Ok(_) => continue,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Pending,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => return Step::Close,
                    }
                }
            }
        }
    }

    /// Whether the exchange was cut off rather than completed (for the counter).
    fn unfinished(&self) -> bool {
        !matches!(self.phase, Phase::Drain)
    }
}

/// The running report server; stopped (thread joined) on drop.
#[derive(Debug)]
pub struct ReportServer {
    control: Option<Arc<ControlSocket>>,
    metrics: Option<Arc<MetricsEndpoint>>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl ReportServer {
    /// Starts serving `control` and `metrics` (either may be absent; with neither, there is no
    /// server) from `board`.
    pub fn start(
        control: Option<ControlSocket>,
        metrics: Option<MetricsEndpoint>,
        board: Board,
    ) -> std::io::Result<Option<ReportServer>> {
        if control.is_none() && metrics.is_none() {
            return Ok(None);
        }
        let stop = Arc::new(EventFd::from_value_and_flags(
            0,
            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
        )?);
        let control = control.map(Arc::new);
        let metrics = metrics.map(Arc::new);
        let thread = {
            let (control, metrics, stop) = (control.clone(), metrics.clone(), stop.clone());
            std::thread::Builder::new()
                .name("tapir-report".into())
                .spawn(move || run(control.as_deref(), metrics.as_deref(), &stop, &board))?
        };
        Ok(Some(ReportServer {
            control,
            metrics,
            stop,
            thread: Some(thread),
        }))
    }

    /// The control socket, if served.
    pub fn control(&self) -> Option<&ControlSocket> {
        self.control.as_deref()
    }

    /// The metrics endpoint, if served.
    pub fn metrics(&self) -> Option<&MetricsEndpoint> {
        self.metrics.as_deref()
    }

    /// A successor serves the endpoints now: stops answering, and leaves the control socket's
    /// file in place.
    pub fn hand_over(mut self) {
        self.halt();
        if let Some(c) = &self.control {
            c.keep_file();
        }
    }

    fn halt(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            if t.join().is_err() {
                tracing::error!("the report server's thread panicked");
            }
        }
    }
}

impl Drop for ReportServer {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The thread: accepts, advances clients, cuts off those past their deadline, until `stop`.
fn run(
    control: Option<&ControlSocket>,
    metrics: Option<&MetricsEndpoint>,
    stop: &EventFd,
    board: &Board,
) {
    let mut clients: Vec<Client> = Vec::new();
    loop {
        let now = Instant::now();
        let before = clients.len();
        clients.retain(|c| c.deadline > now);
        board.count_cut_off(before - clients.len());
        let timeout = clients
            .iter()
            .map(|c| c.deadline.saturating_duration_since(now))
            .min()
            .map_or(PollTimeout::NONE, |d| {
                // Rounded up: a poll that returns just before the deadline would spin.
                let ms = d.as_millis().saturating_add(1).min(1000);
                PollTimeout::try_from(ms as i32).unwrap_or(PollTimeout::MAX)
            });
        let mut fds = vec![PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
        let listeners = [
            control.map(|c| (c.fd(), Protocol::Control)),
            metrics.map(|m| (m.fd(), Protocol::Metrics)),
        ];
        for (fd, _) in listeners.iter().flatten() {
            fds.push(PollFd::new(*fd, PollFlags::POLLIN));
        }
        let first_client = fds.len();
        for c in &clients {
            fds.push(PollFd::new(c.stream.fd(), c.interest()));
        }
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!(error = %e, "report server: poll failed; control and metrics stop");
                return;
            }
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready.first() == Some(&true) {
            return;
        }
        // Clients first (their indices are those polled), then the new ones.
        let mut polled = ready.get(first_client..).unwrap_or_default().iter();
        clients.retain_mut(|c| {
            if !polled.next().copied().unwrap_or(false) {
                return true;
            }
            match c.advance(board) {
                Step::Pending => true,
                Step::Close => {
                    if c.unfinished() {
                        board.count_cut_off(1);
                    }
                    false
                }
            }
        });
        for (n, (_, protocol)) in listeners.iter().flatten().enumerate() {
            if ready.get(1 + n) == Some(&true) {
                accept_all(*protocol, control, metrics, &mut clients, board);
            }
        }
    }
}

/// Accepts every waiting client of `protocol`'s listener (closing those beyond the limit).
fn accept_all(
    protocol: Protocol,
    control: Option<&ControlSocket>,
    metrics: Option<&MetricsEndpoint>,
    clients: &mut Vec<Client>,
    board: &Board,
) {
    loop {
        let accepted = match protocol {
            Protocol::Control => {
                control.map(|c| c.listener().accept().map(|(s, _)| Stream::Unix(s)))
            }
            Protocol::Metrics => {
                metrics.map(|m| m.listener().accept().map(|(s, _)| Stream::Tcp(s)))
            }
        };
        let stream = match accepted {
            Some(Ok(s)) => s,
            Some(Err(e)) if e.kind() == ErrorKind::Interrupted => continue,
            Some(Err(e)) if e.kind() == ErrorKind::WouldBlock => return,
            Some(Err(e)) => {
                // Out of fds, say: the client stays queued; the next poll tries again (after
                // a pause, so that a listener that stays readable does not spin).
                tracing::warn!(error = %e, "report server: accept");
                std::thread::sleep(Duration::from_millis(50));
                return;
            }
            None => return,
        };
        if clients.len() >= MAX_CLIENTS {
            board.count_refused();
            continue;
        }
        let nonblocking = match &stream {
            Stream::Unix(s) => s.set_nonblocking(true),
            Stream::Tcp(s) => s.set_nonblocking(true),
        };
        if nonblocking.is_err() {
            continue;
        }
        clients.push(Client {
            stream,
            protocol,
            phase: Phase::Request(Vec::new()),
            deadline: Instant::now() + CLIENT_DEADLINE,
        });
    }
}
