//! Release builds of `agora` lay its code out in the order of `link-order.txt`: every function
//! that start-up, the idle loops and the hot paths run, first and together (lld's
//! `--symbol-ordering-file`). The kernel maps an executable's pages around each page a process
//! touches, so code the process runs scattered over the whole `.text` keeps most of the binary
//! resident; laid out together it is a fraction of it (README: Benchmarks, memory).
//! `scripts/link-order` regenerates the file (callgrind of `agora up` and of a distributed
//! system); a symbol it names that a build no longer has is skipped, so a stale file costs
//! memory, never a failed link.
//!
//! Its relative relocations are packed too (`-z pack-relative-relocs`, DT_RELR) when the
//! glibc it is built on reads them (2.36 and later): the dynamic loader reads every one at
//! start, 1.7 MB of `.rela.dyn` in the usual format against a few kB packed.
//!
//! Only where the linker is known to be lld: Rust ≥ 1.90 on x86_64-unknown-linux-gnu links
//! with its own rust-lld, unless a linker is chosen in RUSTFLAGS. `LINK_ORDER=off` turns
//! both off (not an `AGORA_` variable: the binary's configuration refuses `AGORA_` names it
//! does not know, and a build's environment is often the shell `agora` then runs in).

use std::path::Path;
use std::process::Command;

const ORDER: &str = "link-order.txt";

fn main() {
    println!("cargo:rerun-if-changed={ORDER}");
    println!("cargo:rerun-if-env-changed=LINK_ORDER");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let wanted = std::env::var("LINK_ORDER").map_or(true, |v| v != "off");
    let order = Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join(ORDER);
    if release && wanted && order.is_file() && links_with_lld() {
        println!(
            "cargo:rustc-link-arg-bin=agora=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bin=agora=-Wl,--no-warn-symbol-ordering");
        if glibc_reads_relr() {
            println!("cargo:rustc-link-arg-bin=agora=-Wl,-z,pack-relative-relocs");
        }
    }
}

/// Whether the build host's glibc is 2.36 or later (`getconf GNU_LIBC_VERSION`: "glibc 2.36"),
/// the first to read packed relative relocations; a binary with them does not start on an
/// older one.
fn glibc_reads_relr() -> bool {
    let Ok(out) = Command::new("getconf").arg("GNU_LIBC_VERSION").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.trim().strip_prefix("glibc ").unwrap_or_default();
    version_at_least(version, (2, 36))
}

/// Whether a dotted `version` ("1.95.0", "2.36") is at least `(major, minor)`.
fn version_at_least(version: &str, least: (u32, u32)) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= least
}

/// Whether this build links with rustc's own lld (the default of Rust ≥ 1.90 on
/// x86_64-unknown-linux-gnu, unless RUSTFLAGS name another linker).
fn links_with_lld() -> bool {
    let target = std::env::var("TARGET").unwrap_or_default();
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if target != "x86_64-unknown-linux-gnu" || flags.contains("linker") {
        return false;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let Ok(out) = Command::new(rustc).arg("--version").output() else {
        return false;
    };
    // "rustc 1.95.0 (...)"
    let version = String::from_utf8_lossy(&out.stdout);
    version_at_least(
        version.split_whitespace().nth(1).unwrap_or_default(),
        (1, 90),
    )
}
