//! Writes the committed seed corpora: `cargo run --release --bin make_seeds -- corpus`.
//! A few hand-made inputs per target, in each target's input format (see its doc comment).

use std::path::Path;

use tapir_fuzz::Output;

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "corpus".into());
    let dir = Path::new(&dir);
    for (target, seeds) in all() {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).expect("mkdir");
        for (name, bytes) in seeds {
            std::fs::write(d.join(name), bytes).expect("write seed");
        }
    }
}

type Seeds = Vec<(&'static str, Vec<u8>)>;

fn all() -> Vec<(&'static str, Seeds)> {
    vec![("chain_walk", chain_walk())]
}

/// A descriptor in its guest layout.
fn desc(o: &mut Output, addr: u64, len: u32, flags: u16, next: u16) {
    o.u64(addr).u32(len).u16(flags).u16(next);
}

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

fn chain_walk() -> Seeds {
    let hdr = |o: &mut Output, head: u16, flags: u8| {
        o.u16(head).u8(flags).u8(0).u64(0);
    };
    let mut s = Seeds::new();
    let mut o = Output::default();
    hdr(&mut o, 0, 0);
    desc(&mut o, 0x4000, 12, NEXT, 1);
    desc(&mut o, 0x5000, 1500, 0, 0);
    s.push(("two_tx", o.data));
    let mut o = Output::default();
    hdr(&mut o, 0, 1);
    desc(&mut o, 0x2000, 32, INDIRECT, 0);
    o.bytes(&vec![0u8; 0x1000 - 16]);
    desc(&mut o, 0x4000, 12, WRITE | NEXT, 1);
    desc(&mut o, 0x20000, 1500, WRITE, 0);
    s.push(("indirect_rx", o.data));
    let mut o = Output::default();
    hdr(&mut o, 0, 0);
    desc(&mut o, 0xfff0, 0x20, 0, 0);
    s.push(("across_hole", o.data));
    let mut o = Output::default();
    hdr(&mut o, 0, 4);
    desc(&mut o, 0x4000, 10, NEXT, 1);
    desc(&mut o, 0x4000, 10, NEXT, 0);
    s.push(("loop", o.data));
    s
}
