//! A vhost-user frontend that writes its messages by hand: for requests the rust-vmm `vhost`
//! frontend cannot send (hostile ones, `SEND_RARP`, `NET_SET_MTU`) and for reading exactly what
//! comes back.

use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

// vhost-user request codes.
pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const SEND_RARP: u32 = 19;
pub const NET_SET_MTU: u32 = 20;

pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// MQ, LOG_SHMFD, REPLY_ACK, CONFIGURE_MEM_SLOTS.
pub const PROTOCOL: u64 = 1 | (1 << 1) | (1 << 3) | (1 << 15);
/// `VHOST_USER_PROTOCOL_F_RARP`.
pub const PROTOCOL_F_RARP: u64 = 1 << 2;
/// `VHOST_USER_PROTOCOL_F_NET_MTU`.
pub const PROTOCOL_F_NET_MTU: u64 = 1 << 4;

/// A frontend that writes vhost-user messages by hand.
pub struct Raw {
    pub s: UnixStream,
}

/// What came back for a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// A reply (its body).
    Reply(Vec<u8>),
    /// The daemon closed the connection.
    Closed,
}

impl Raw {
    pub fn send(&self, request: u32, need_reply: bool, body: &[u8], fds: &[BorrowedFd<'_>]) {
        let flags = 0x1 | if need_reply { 0x8 } else { 0 };
        let mut msg: Vec<u8> = [request, flags, u32::try_from(body.len()).unwrap()]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        msg.extend_from_slice(body);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        let iov = [std::io::IoSlice::new(&msg)];
        let n = sendmsg::<()>(
            self.s.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .expect("sendmsg");
        assert_eq!(n, msg.len());
    }

    pub fn answer(&mut self) -> Answer {
        let mut hdr = [0u8; 12];
        if self.s.read_exact(&mut hdr).is_err() {
            return Answer::Closed;
        }
        let size = u32::from_ne_bytes(hdr[8..12].try_into().unwrap());
        let mut body = vec![0u8; size as usize];
        if self.s.read_exact(&mut body).is_err() {
            return Answer::Closed;
        }
        Answer::Reply(body)
    }

    /// Sends a request with REPLY_ACK and returns the status (0: success).
    pub fn request(&mut self, request: u32, body: &[u8], fds: &[BorrowedFd<'_>]) -> Option<u64> {
        self.send(request, true, body, fds);
        match self.answer() {
            Answer::Reply(b) if b.len() == 8 => Some(u64::from_ne_bytes(b.try_into().unwrap())),
            Answer::Reply(b) => panic!("a REPLY_ACK of {} bytes", b.len()),
            Answer::Closed => None,
        }
    }

    /// Asserts the request is refused with a failure reply.
    pub fn refused(&mut self, request: u32, body: &[u8], fds: &[BorrowedFd<'_>], ctx: &str) {
        let status = self.request(request, body, fds);
        assert!(
            matches!(status, Some(s) if s != 0),
            "{ctx}: expected a failure reply, got {status:?} (None: the connection closed)"
        );
    }

    pub fn accepted(&mut self, request: u32, body: &[u8], fds: &[BorrowedFd<'_>], ctx: &str) {
        let status = self.request(request, body, fds);
        assert_eq!(status, Some(0), "{ctx}: expected success");
    }

    /// The session still answers.
    pub fn still_answers(&mut self, ctx: &str) {
        self.send(GET_FEATURES, false, &[], &[]);
        assert!(
            matches!(self.answer(), Answer::Reply(b) if b.len() == 8),
            "{ctx}: the session did not go on"
        );
    }

    /// Asserts the daemon ends the session: the connection closes without a reply.
    pub fn closed(&mut self, ctx: &str) {
        self.s
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut b = [0u8; 64];
        match self.s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Ok(n) => panic!("{ctx}: expected the session to end, got {n} bytes"),
            Err(e) => panic!("{ctx}: expected the session to end: {e}"),
        }
    }

    /// Negotiates protocol features (REPLY_ACK among them) and, with `extra`, more features.
    pub fn negotiate(&mut self, extra: u64) {
        self.negotiate_with(extra, PROTOCOL);
    }

    /// Negotiates `protocol` (which should hold REPLY_ACK) and, with `extra`, more features.
    pub fn negotiate_with(&mut self, extra: u64, protocol: u64) {
        self.send(GET_FEATURES, false, &[], &[]);
        assert!(matches!(self.answer(), Answer::Reply(_)));
        self.send(
            SET_FEATURES,
            false,
            &(F_PROTOCOL_FEATURES | extra).to_ne_bytes(),
            &[],
        );
        self.send(SET_PROTOCOL_FEATURES, false, &protocol.to_ne_bytes(), &[]);
    }
}
