//! `tapir ctl PATH stats|status`: asks a running `tapir serve --control PATH` for its report.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::Value;

#[derive(Args)]
pub struct CtlArgs {
    /// The daemon's control socket (`tapir serve --control PATH`).
    socket: PathBuf,
    /// `stats`: the whole report as one JSON object; `status`: a short summary.
    #[arg(value_enum)]
    what: What,
}

#[derive(Clone, Copy, ValueEnum)]
enum What {
    Stats,
    Status,
}

/// The daemon's report.
fn fetch(socket: &PathBuf) -> Result<Value> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the control socket {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    (&stream).write_all(b"stats\n")?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .context("reading the report")?;
    let v: Value = serde_json::from_str(&line).context("the report is not JSON")?;
    if let Some(e) = v.get("error") {
        bail!("the daemon says: {e}");
    }
    Ok(v)
}

fn num(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// A few lines a person reads.
fn summary(v: &Value) -> String {
    let mut out = format!(
        "tapir serve pid {}, engine {}, {} queue pairs\n",
        num(v, &["pid"]),
        v["engine"].as_str().unwrap_or("?"),
        num(v, &["queues"]),
    );
    match v.get("session").filter(|s| !s.is_null()) {
        Some(s) => out.push_str(&format!(
            "frontend: pid {} uid {}, features {}, running pairs {}\n",
            s["frontend_pid"],
            s["frontend_uid"],
            s["features"].as_str().unwrap_or("?"),
            s["running_pairs"]
        )),
        None => out.push_str("frontend: none connected\n"),
    }
    for p in v["queue_pairs"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "pair {}{}: rx {} pkts {} B, tx {} pkts {} B, malformed {}, broken {}\n",
            num(p, &["pair"]),
            if p["running"].as_bool() == Some(true) {
                ""
            } else {
                " (stopped)"
            },
            num(p, &["rx", "packets"]),
            num(p, &["rx", "bytes"]),
            num(p, &["tx", "packets"]),
            num(p, &["tx", "bytes"]),
            num(p, &["rx", "malformed"]) + num(p, &["tx", "malformed"]),
            num(p, &["broken", "pairs"]) + num(p, &["broken", "queues"]),
        ));
    }
    out.push_str(&format!(
        "handoffs: {}, last downtimes (ns) {}\n",
        num(v, &["handoffs", "count"]),
        v["handoffs"]["last_downtimes_ns"]
    ));
    out
}

pub fn run(args: CtlArgs) -> Result<()> {
    let v = fetch(&args.socket)?;
    match args.what {
        What::Stats => println!("{v}"),
        What::Status => print!("{}", summary(&v)),
    }
    Ok(())
}
