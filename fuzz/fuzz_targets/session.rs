//! A vhost-user `Session` fed an arbitrary sequence of requests decoded from the input, each
//! with real fds (64 KiB and 4 KiB memfds, eventfds, pipes), over a socketpair `Connection`
//! (the replies go to the other end). Requests whose rings become ready start the real
//! device: its workers run on a two-queue TAP that lives in a network namespace the fuzz
//! process makes for itself at start (`unshare(CLONE_NEWNET)`, needs root), with its link
//! down, so nothing reaches a network. The engine (uring or classic) is the input's first
//! choice. It never panics (a worker panic aborts too), and once the session is stopped and
//! dropped the process's fd count is back at its baseline. Run with `-rss_limit_mb` and
//! `-malloc_limit_mb` (see fuzz/README.md).
//!
//! With `TAPIR_FUZZ_SKIP_KNOWN=1`, requests mapping a region or log past the end of its file
//! are left out (the open SIGBUS and bitmap-size crashes).
//!
//! Input: engine (u8, bit 0: classic), then up to 48 requests, each: op (u8: request code
//! `% 40`), flags (u8: bit 0 NEED_REPLY, bit 1 the body is raw input bytes), fd count (u8,
//! % 4) and a kind per fd (u8: 0 memfd 64 KiB, 1 eventfd, 2 memfd 4 KiB, 3 a pipe's read end),
//! then the body: raw (u16 length + bytes) or built from fields (see `body`).
#![no_main]

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tapir_datapath::EngineConfig;
use tapir_datapath::{EngineKind, TapQueue};
use tapir_fuzz::{eventfd, fd_count, memfd, private_tap, Input};
use tapir_vhost_user::wire::{Connection, Header, Request};
use tapir_vhost_user::{offered_features, offered_protocol_features, Session, SessionConfig};

/// Where the frontend "maps" guest memory (its virtual addresses).
const USER_BASE: u64 = 0x7f00_0000_0000;

/// The TAP's two queues, opened once in the private namespace.
fn tap_fds() -> &'static [OwnedFd] {
    static TAPS: OnceLock<Vec<OwnedFd>> = OnceLock::new();
    TAPS.get_or_init(|| {
        let tap = private_tap("fuzz0", 2);
        tap.into_queues()
            .into_iter()
            .map(TapQueue::into_fd)
            .collect()
    })
}

/// One TAP queue per pair; each session adopts duplicates (as the daemon does).
fn taps(fds: &[OwnedFd]) -> Arc<Vec<TapQueue>> {
    Arc::new(
        fds.iter()
            .map(|fd| TapQueue::adopt(fd.try_clone().expect("dup")).expect("TAP queue"))
            .collect(),
    )
}

/// True unless the request maps a region or log past the end of its (regular) file.
fn backed(code: u32, body: &[u8], fds: &[OwnedFd]) -> bool {
    let word = |at: usize| {
        body.get(at..at + 8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let fits = |fd: Option<&OwnedFd>, offset: u64, size: u64| {
        if size > 1 << 30 {
            // Whatever the fd, the dirty bitmap of a huge region is allocated first.
            return false;
        }
        let Some(fd) = fd else { return true };
        let Ok(st) = nix::sys::stat::fstat(fd) else {
            return true;
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return true;
        }
        let len = u64::try_from(st.st_size).unwrap_or(0);
        offset.checked_add(size).is_some_and(|end| end <= len)
    };
    match code {
        5 => (0..fds.len()).all(|k| fits(fds.get(k), word(8 + 32 * k + 24), word(8 + 32 * k + 8))),
        37 => fits(fds.first(), word(8 + 24), word(8 + 8)),
        6 => fits(fds.first(), word(8), word(0)),
        _ => true,
    }
}

fn fd_of(kind: u8) -> OwnedFd {
    match kind % 4 {
        0 => memfd(0x10000),
        1 => eventfd(),
        2 => memfd(0x1000),
        _ => {
            let (r, _w) = nix::unistd::pipe().expect("pipe");
            r
        }
    }
}

/// An address the frontend might use: inside the first 64 KiB "region" mostly.
fn addr(input: &mut Input) -> u64 {
    match input.u8() % 4 {
        0 => USER_BASE + u64::from(input.u16()) * 16,
        1 => u64::from(input.u16()) * 16,
        2 => USER_BASE + 0x1000 * u64::from(input.u8() % 16),
        _ => input.u64(),
    }
}

fn size(input: &mut Input) -> u64 {
    match input.u8() % 4 {
        0 => 0x10000,
        1 => 0x1000 * u64::from(input.u8() % 32),
        2 => 0x1000,
        _ => input.u64(),
    }
}

fn region(input: &mut Input, out: &mut Vec<u8>) {
    let guest = match input.u8() % 3 {
        0 => 0,
        1 => 0x10000 * u64::from(input.u8()),
        _ => input.u64(),
    };
    let size = size(input);
    let user = match input.u8() % 3 {
        0 => USER_BASE,
        1 => USER_BASE + 0x10000 * u64::from(input.u8()),
        _ => input.u64(),
    };
    let offset = match input.u8() % 3 {
        0 => 0,
        1 => 0x1000 * u64::from(input.u8()),
        _ => input.u64(),
    };
    for v in [guest, size, user, offset] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn vring_index(input: &mut Input) -> u32 {
    match input.u8() {
        n @ 0..=250 => u32::from(n % 4),
        _ => input.u32(),
    }
}

/// A body for `code` built from fields of the input (the request layouts of the vhost crate).
fn body(code: u32, input: &mut Input) -> Vec<u8> {
    let mut b = Vec::new();
    let u64_body = |b: &mut Vec<u8>, v: u64| b.extend_from_slice(&v.to_le_bytes());
    match code {
        // SET_FEATURES
        2 => {
            let v = match input.u8() % 3 {
                0 => offered_features(),
                1 => offered_features() & input.u64(),
                _ => input.u64(),
            };
            u64_body(&mut b, v);
        }
        // SET_PROTOCOL_FEATURES
        16 => {
            let v = match input.u8() % 2 {
                0 => offered_protocol_features().bits(),
                _ => input.u64(),
            };
            u64_body(&mut b, v);
        }
        // SET_MEM_TABLE
        5 => {
            let n = u32::from(input.u8() % 4);
            b.extend_from_slice(&n.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            for _ in 0..n {
                region(input, &mut b);
            }
        }
        // ADD_MEM_REG, REM_MEM_REG
        37 | 38 => {
            u64_body(&mut b, 0);
            region(input, &mut b);
        }
        // SET_LOG_BASE
        6 => {
            u64_body(&mut b, size(input));
            u64_body(&mut b, u64::from(input.u8()) * 0x1000);
        }
        // SET_VRING_NUM, SET_VRING_BASE, GET_VRING_BASE, SET_VRING_ENABLE
        8 | 10 | 11 | 18 => {
            b.extend_from_slice(&vring_index(input).to_le_bytes());
            let num = match (code, input.u8() % 4) {
                (8, 0..=2) => 1u32 << (input.u8() % 10),
                (18, 0..=2) => u32::from(input.u8() % 2),
                (_, 0..=2) => u32::from(input.u16()),
                _ => input.u32(),
            };
            b.extend_from_slice(&num.to_le_bytes());
        }
        // SET_VRING_ADDR
        9 => {
            b.extend_from_slice(&vring_index(input).to_le_bytes());
            b.extend_from_slice(&u32::from(input.u8() % 2).to_le_bytes());
            for _ in 0..3 {
                u64_body(&mut b, addr(input));
            }
            u64_body(&mut b, u64::from(input.u16()) * 16);
        }
        // SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR
        12..=14 => {
            let v = u64::from(vring_index(input) & 0xff) | (u64::from(input.u8() & 1) << 8);
            u64_body(&mut b, v);
        }
        _ => {}
    }
    b
}

fuzz_target!(|data: &[u8]| {
    let fds = tap_fds();
    let baseline = fd_count();
    {
        let taps = taps(fds);
        let mut input = Input::new(data);
        let engine = if input.u8() & 1 == 1 {
            EngineKind::Classic
        } else {
            EngineKind::Uring
        };
        let config = SessionConfig {
            queue_pairs: 2,
            engine,
            engine_config: EngineConfig::default(),
            mac: [0x52, 0x54, 0, 0, 0, 1],
            cpu_affinity: Vec::new(),
            dirty_at_stop: Default::default(),
        };
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        theirs
            .set_nonblocking(true)
            .expect("nonblocking frontend end");
        let conn = Connection::new(ours);
        let mut session = Session::new(config, taps);
        for _ in 0..48 {
            if input.is_empty() {
                break;
            }
            let code = u32::from(input.u8() % 40);
            let flags = input.u8();
            let nfds = input.u8() % 4;
            let fds: Vec<OwnedFd> = (0..nfds).map(|_| fd_of(input.u8())).collect();
            let body = if flags & 2 == 2 {
                input.blob(1024).to_vec()
            } else {
                body(code, &mut input)
            };
            let header = Header {
                request: code,
                flags: 1 | if flags & 1 == 1 { 0x8 } else { 0 },
                size: u32::try_from(body.len()).expect("small body"),
            };
            if tapir_fuzz::skip_known() && !backed(code, &body, &fds) {
                // Open: regions or logs longer than their file (SIGBUS) or huge (bitmap
                // allocation abort), issue 9 items 3 and 4.
                continue;
            }
            let req = Request { header, body, fds };
            let code = req.header.request;
            let handled = session.handle(&conn, req);
            if std::env::var_os("TAPIR_FUZZ_VERBOSE").is_some() {
                eprintln!(
                    "request {code}: {handled:?}, running {:?}",
                    session.running_pairs()
                );
            }
            if handled.is_err() {
                // The daemon ends the session here.
                break;
            }
            // The frontend reads its replies (so the socket never fills).
            let mut sink = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut &theirs, &mut sink) {
                if n == 0 {
                    break;
                }
            }
        }
        session.stop_device();
    }
    assert_eq!(fd_count(), baseline, "fds leaked by a session");
});
