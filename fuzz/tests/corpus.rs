//! Every input of the seed corpus (`fuzz/corpus/<target>/`) through its
//! target, as a plain test: CI replays the corpus even without AFL++, and
//! an input that once crashed a decoder, saved there, stays a regression
//! test. The corpus must match the seeds the targets generate from real
//! frames and blocks (`CSNAP_FUZZ_WRITE_SEEDS=1` rewrites it).

use std::path::PathBuf;

fn corpus_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(name)
}

#[test]
fn seed_corpus_is_current() {
    let write = std::env::var_os("CSNAP_FUZZ_WRITE_SEEDS").is_some();
    for t in csnap_fuzz::TARGETS {
        let dir = corpus_dir(t.name);
        for (i, seed) in (t.seeds)().iter().enumerate() {
            let p = dir.join(format!("seed-{i:02}"));
            if write {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&p, seed).unwrap();
            } else {
                let have = std::fs::read(&p).unwrap_or_else(|e| {
                    panic!(
                        "{}: {e} (run CSNAP_FUZZ_WRITE_SEEDS=1 cargo test -p csnap-fuzz)",
                        p.display()
                    )
                });
                assert!(
                    have == *seed,
                    "{} differs from the generated seed (run CSNAP_FUZZ_WRITE_SEEDS=1 cargo test -p csnap-fuzz)",
                    p.display()
                );
            }
        }
    }
}

#[test]
fn every_corpus_input_runs_clean() {
    let mut total = 0;
    for t in csnap_fuzz::TARGETS {
        let dir = corpus_dir(t.name);
        let mut n = 0;
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let data = std::fs::read(&p).unwrap();
            (t.run)(&data);
            n += 1;
        }
        assert!(n > 0, "no corpus for {}", t.name);
        println!("{}: {n} inputs", t.name);
        total += n;
    }
    println!("{total} corpus inputs replayed");
}

/// Inputs nothing generated: empty, short, long, all ones.
#[test]
fn degenerate_inputs_run_clean() {
    for t in csnap_fuzz::TARGETS {
        for data in [
            vec![],
            vec![0],
            vec![0xff; 7],
            vec![0; 4096],
            vec![0xff; 3 * 4096 + 5],
        ] {
            (t.run)(&data);
        }
    }
}
