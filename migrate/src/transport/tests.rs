use super::*;

/// Tests that count this process's fds run one at a time.
static FD_COUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

fn eventfds(n: usize) -> Vec<OwnedFd> {
    (0..n)
        .map(|_| {
            nix::sys::eventfd::EventFd::new()
                .map(OwnedFd::from)
                .unwrap_or_else(|e| panic!("eventfd: {e}"))
        })
        .collect()
}

fn send_raw(ch: &Channel, fds: &[OwnedFd]) {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let kind = [1u8];
    let iov = [IoSlice::new(&kind)];
    let sent = sendmsg::<()>(
        ch.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::empty(),
        None,
    );
    assert!(sent.is_ok(), "{sent:?}");
}

#[test]
fn a_message_with_too_many_fds_is_refused_and_its_fds_closed() {
    let _one = FD_COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    let (a, b) = Channel::pair().unwrap_or_else(|e| panic!("{e}"));
    let before = open_fds();
    let refused = refused_messages();
    {
        let fds = eventfds(253);
        send_raw(&a, &fds);
    }
    let got = b.recv(Some(Duration::from_secs(1)));
    assert!(
        matches!(&got, Err(ChannelError::Malformed(m)) if m.contains("more than 250 fds")),
        "{got:?}"
    );
    assert_eq!(open_fds(), before, "fds left open by a refused message");
    assert!(refused_messages() > refused);
    // The channel goes on: a message within the limits arrives with its fds.
    let fds = eventfds(250);
    send_raw(&a, &fds);
    let m = b
        .recv(Some(Duration::from_secs(1)))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.fds.len(), 250);
}

/// A timeout below a millisecond still waits (poll(2) counts whole milliseconds: rounding
/// the time left down made `accept(Some(1 ms))` return at once, a busy loop for a caller that
/// polls the listener every millisecond).
#[test]
fn a_sub_millisecond_timeout_waits_its_length() {
    // It opens fds: not while another test counts them.
    let _one = FD_COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("tapir-timeout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let listener = Listener::bind(&dir.join("s")).unwrap_or_else(|e| panic!("{e}"));
    for wait in [Duration::from_micros(300), Duration::from_millis(1)] {
        for _ in 0..20 {
            let start = std::time::Instant::now();
            let got = listener.accept(Some(wait));
            assert!(matches!(got, Err(ChannelError::Timeout(_))), "{got:?}");
            // A lower bound only: the clock is monotonic and poll never returns early.
            assert!(
                start.elapsed() >= wait,
                "{wait:?} timeout returned after {:?}",
                start.elapsed()
            );
        }
    }
    drop(listener);
    let _ = std::fs::remove_dir_all(&dir);
}
