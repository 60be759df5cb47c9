//! One AFL++ persistent-mode binary for every target: `csnap-fuzz-afl TARGET`.
fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(target) = csnap_fuzz::target(&name) else {
        eprintln!(
            "usage: csnap-fuzz-afl TARGET (one of: {})",
            csnap_fuzz::TARGETS
                .iter()
                .map(|t| t.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| {
        (target.run)(data);
    });
}
