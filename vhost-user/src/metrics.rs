//! `tapir serve --metrics 127.0.0.1:PORT`: the control report ([`crate::control`]) as
//! Prometheus text at `GET /metrics`, encoded by prometheus-client, answered by a minimal HTTP
//! responder on the report server's thread ([`crate::report_server`]; loopback only; one
//! request per connection; a client gets 1 s for its request line and the reply). The
//! registry is built per scrape from the counters the workers already publish: nothing new on
//! the hot path.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::Value;

/// The longest request line taken.
pub const MAX_REQUEST: usize = 4096;

/// Errors of binding the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Not a loopback address.
    #[error("--metrics {0}: only a loopback address (127.0.0.1:PORT or [::1]:PORT) is served")]
    NotLoopback(SocketAddr),
    /// Binding.
    #[error("binding the metrics endpoint {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
}

/// The bound endpoint.
#[derive(Debug)]
pub struct MetricsEndpoint {
    listener: TcpListener,
}

type Labels = Vec<(String, String)>;

impl MetricsEndpoint {
    /// Binds `addr` (loopback only).
    pub fn bind(addr: SocketAddr) -> Result<MetricsEndpoint, MetricsError> {
        if !addr.ip().is_loopback() {
            return Err(MetricsError::NotLoopback(addr));
        }
        let listener = TcpListener::bind(addr).map_err(|e| MetricsError::Bind(addr, e))?;
        MetricsEndpoint::from_listener(listener).map_err(|e| MetricsError::Bind(addr, e))
    }

    /// Wraps a bound listener (one a predecessor handed on).
    pub fn from_listener(listener: TcpListener) -> std::io::Result<MetricsEndpoint> {
        listener.set_nonblocking(true)?;
        Ok(MetricsEndpoint { listener })
    }

    /// The listener.
    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }

    /// Its fd (for a successor).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

/// The HTTP reply to one request line (`GET /metrics` gets the report as Prometheus text,
/// anything else a 404).
pub fn reply(request_line: &str, report: impl FnOnce() -> Value) -> Vec<u8> {
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, kind, body) =
        if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                prometheus_text(&report()),
            )
        } else {
            (
                "404 Not Found",
                "text/plain",
                "only GET /metrics\n".to_owned(),
            )
        };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn num(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Registers a counter family under `name` (encoded `name_total`).
fn family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    registry.register(name, help, f.clone());
    f
}

/// The report in Prometheus text format.
pub fn prometheus_text(v: &Value) -> String {
    let mut r = Registry::with_prefix("tapir");
    let packets = family(
        &mut r,
        "packets",
        "Frames moved, by queue pair and direction (rx: to the guest).",
    );
    let bytes = family(
        &mut r,
        "bytes",
        "Frame bytes moved (without the vnet header).",
    );
    let drops = family(&mut r, "drops", "Frames dropped, by cause.");
    let malformed = family(
        &mut r,
        "malformed_chains",
        "Descriptor chains the guest got wrong.",
    );
    let kicks = family(&mut r, "kicks", "Guest notifications (kick eventfd reads).");
    let interrupts = family(
        &mut r,
        "interrupts",
        "Interrupts sent to the guest (call eventfd writes).",
    );
    let batches = family(&mut r, "batches", "Worker loop batches.");
    let broken = family(
        &mut r,
        "broken",
        "Queues and pairs stopped for a guest error.",
    );
    let running = Family::<Labels, Gauge>::default();
    r.register(
        "pair_running",
        "1 while the queue pair's worker runs.",
        running.clone(),
    );
    for p in v["queue_pairs"].as_array().into_iter().flatten() {
        let pair = num(p, &["pair"]).to_string();
        for dir in ["rx", "tx"] {
            let l = labels(&[("pair", &pair), ("direction", dir)]);
            packets.get_or_create(&l).inc_by(num(p, &[dir, "packets"]));
            bytes.get_or_create(&l).inc_by(num(p, &[dir, "bytes"]));
            malformed
                .get_or_create(&l)
                .inc_by(num(p, &[dir, "malformed"]));
            kicks.get_or_create(&l).inc_by(num(p, &[dir, "kicks"]));
            interrupts
                .get_or_create(&l)
                .inc_by(num(p, &[dir, "interrupts"]));
            if let Some(causes) = p[dir]["drops"].as_object() {
                for (cause, n) in causes {
                    drops
                        .get_or_create(&labels(&[
                            ("pair", &pair),
                            ("direction", dir),
                            ("cause", cause),
                        ]))
                        .inc_by(n.as_u64().unwrap_or(0));
                }
            }
        }
        batches
            .get_or_create(&labels(&[("pair", &pair)]))
            .inc_by(num(p, &["batches"]));
        for what in ["queues", "pairs"] {
            broken
                .get_or_create(&labels(&[("pair", &pair), ("what", what)]))
                .inc_by(num(p, &["broken", what]));
        }
        running
            .get_or_create(&labels(&[("pair", &pair)]))
            .set(i64::from(p["running"].as_bool() == Some(true)));
    }
    let handoffs = Counter::<u64>::default();
    handoffs.inc_by(num(v, &["handoffs", "count"]));
    r.register("handoffs", "Handoffs the session went through.", handoffs);
    let connected = Gauge::<i64>::default();
    connected.set(i64::from(!v["session"].is_null()));
    r.register(
        "frontend_connected",
        "1 while a frontend is connected.",
        connected,
    );
    let mut out = String::new();
    if encode(&mut out, &r).is_err() {
        out.clear();
    }
    out
}
