//! The real-guest groundwork (vhost-user issue): `tests/guest/build-initramfs.sh` builds an
//! initramfs from Debian's kernel and busybox, and QEMU boots it under TCG with the virtio-net
//! driver stack loaded. `.ci/run` installs the packages; elsewhere the test says loudly what
//! is missing and passes without booting.

use std::process::Command;

fn missing_tools() -> Vec<&'static str> {
    ["qemu-system-x86_64", "busybox", "cpio"]
        .into_iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect()
}

#[test]
fn guest_boots_with_the_virtio_net_driver() {
    let missing = missing_tools();
    if !missing.is_empty() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have {missing:?} (.ci/run installs them)"
        );
        eprintln!("SKIPPED: {missing:?} not installed (apt-get install qemu-system-x86 linux-image-amd64 busybox-static cpio)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("tapir-guest-{}", std::process::id()));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/guest/build-initramfs.sh"
    );
    let out = Command::new(script)
        .arg(&dir)
        .output()
        .expect("build-initramfs.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let paths = String::from_utf8_lossy(&out.stdout);
    let mut lines = paths.lines();
    let (kernel, initrd) = (lines.next().unwrap(), lines.next().unwrap());
    // The guest lists its loaded modules; no network device is attached yet.
    let check = "grep -o '^virtio_net' /proc/modules; grep -o '^virtio_pci ' /proc/modules";
    let encoded = Command::new("base64")
        .args(["-w0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(check.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    let b64 = String::from_utf8(encoded.stdout).unwrap();
    let boot = Command::new("timeout")
        .args([
            "120",
            "qemu-system-x86_64",
            "-machine",
            "q35,accel=tcg",
            "-m",
            "256",
            "-nographic",
        ])
        .args([
            "-no-reboot",
            "-nic",
            "none",
            "-kernel",
            kernel,
            "-initrd",
            initrd,
        ])
        .arg("-append")
        .arg(format!("console=ttyS0 quiet panic=-1 tapir.script={b64}"))
        .output()
        .unwrap();
    let console = String::from_utf8_lossy(&boot.stdout);
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        console.contains("TAPIR-GUEST-UP"),
        "the guest did not boot: {console}"
    );
    assert!(
        console.contains("virtio_net"),
        "virtio_net not loaded: {console}"
    );
    assert!(
        console.contains("virtio_pci"),
        "virtio_pci not loaded: {console}"
    );
    assert!(console.contains("TAPIR-GUEST-DONE"), "{console}");
}
