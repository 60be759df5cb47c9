#!/usr/bin/env bash
# Coverage-guided fuzzing of every csnap decoder with AFL++ (cargo-afl, on
# the stable toolchain). The targets are in fuzz/src (csnap-fuzz), the
# AFL++ driver in fuzz/afl, the seed corpus in fuzz/corpus/<target>/.
#
#   scripts/fuzz.sh --ci                 every target for 20 s (CI)
#   scripts/fuzz.sh --seconds N [T ...]  every target (or the named ones) for N s
#   scripts/fuzz.sh --list               the targets
#
# Prints per target: executions, executions per second, corpus entries
# found, crashes and hangs. Exits non-zero when any target crashed or hung
# (each crash is re-run and its panic message printed; the input stays in
# the output directory, FUZZ_OUT, default target/fuzz-out/<target>/). Save
# a crash input to fuzz/corpus/<target>/ once fixed: the plain test
# `cargo test -p csnap-fuzz` replays the corpus.
#
# Needs cargo-afl (`cargo install cargo-afl`, which builds its own AFL++
# and runtime; `cargo afl config --build` if missing) and a C compiler;
# .ci/packages.sh installs Debian's afl++ for the toolchain it pulls in.
set -euo pipefail

cd "$(dirname "$0")/.."
seconds=20
targets=()
while (($#)); do
    case "$1" in
    --ci) seconds=20 ;;
    --seconds)
        seconds="$2"
        shift
        ;;
    --list)
        sed -n 's/^        name: "\(.*\)",$/\1/p' fuzz/src/lib.rs
        exit 0
        ;;
    -h | --help)
        sed -n '2,20p' "$0"
        exit 0
        ;;
    *) targets+=("$1") ;;
    esac
    shift
done
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(sed -n 's/^        name: "\(.*\)",$/\1/p' fuzz/src/lib.rs)
fi

if ! cargo afl --version >/dev/null 2>&1; then
    echo "== cargo install cargo-afl"
    cargo install --locked cargo-afl
fi

target_dir="${CARGO_TARGET_DIR:-$PWD/target}/afl"
echo "== cargo afl build --release (fuzz/afl, into $target_dir)"
if ! (cd fuzz/afl && CARGO_TARGET_DIR="$target_dir" cargo afl build --release --locked); then
    # A cargo-afl whose AFL++ runtime is missing (or for another rustc).
    echo "== cargo afl config --build --force"
    cargo afl config --build --force
    (cd fuzz/afl && CARGO_TARGET_DIR="$target_dir" cargo afl build --release --locked)
fi
bin="$target_dir/release/csnap-fuzz-afl"
out_root="${FUZZ_OUT:-$PWD/target/fuzz-out}"
mkdir -p "$out_root"

export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1
export AFL_NO_AFFINITY=1 AFL_SKIP_CRASHES=0 AFL_QUIET=1
failed=0
summary=()
stat() { sed -n "s/^$1 *: *//p" "$2" | head -1; }
for t in "${targets[@]}"; do
    out="$out_root/$t"
    rm -rf "$out"
    echo "== $t: ${seconds}s (afl-fuzz -i fuzz/corpus/$t -o $out)"
    # -t: a per-input time limit generous for a shared, loaded machine.
    if ! cargo afl fuzz -V "$seconds" -t 2000 -i "fuzz/corpus/$t" -o "$out" -- "$bin" "$t" \
        >"$out_root/$t.log" 2>&1; then
        echo "afl-fuzz failed for $t:"
        tail -20 "$out_root/$t.log"
        failed=1
        continue
    fi
    s="$out/default/fuzzer_stats"
    execs=$(stat execs_done "$s")
    eps=$(stat execs_per_sec "$s")
    corpus=$(stat corpus_count "$s")
    crashes=$(stat saved_crashes "$s")
    hangs=$(stat saved_hangs "$s")
    cov=$(stat bitmap_cvg "$s")
    summary+=("$(printf '%-12s %12s execs %9s/s  corpus %5s  edges %7s  crashes %s  hangs %s' \
        "$t" "$execs" "$eps" "$corpus" "$cov" "$crashes" "$hangs")")
    for f in "$out"/default/crashes/id*; do
        [[ -e "$f" ]] || continue
        failed=1
        echo "!! $t crashed on $f; reproduce: $bin $t < $f"
        "$bin" "$t" <"$f" 2>&1 | grep -A3 -m1 panicked || true
    done
    for f in "$out"/default/hangs/id*; do
        [[ -e "$f" ]] || continue
        # A hang under load may be the machine: it counts if a rerun alone
        # still takes more than 10 s.
        if ! timeout 10 "$bin" "$t" <"$f" >/dev/null 2>&1; then
            failed=1
            echo "!! $t hangs on $f; reproduce: $bin $t < $f"
        fi
    done
done

echo "== fuzz summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
if ((failed)); then
    echo "== fuzzing found problems (see above)"
    exit 1
fi
echo "== no crash, no hang"
