#!/usr/bin/env bash
# Builds the libFuzzer harnesses of the native code with clang, AddressSanitizer and
# UndefinedBehaviorSanitizer: build/fuzz/decoder_fuzzer, build/fuzz/topk_fuzzer.
# Needs clang (Debian: apt-get install -y clang); the test suite does not (its smoke run
# goes through the Python harnesses).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-$root/build/fuzz}"
mkdir -p "$out"
flags=(-std=c++17 -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined
       -fno-sanitize-recover=undefined -I "$root/native")
clang++ "${flags[@]}" "$root/tests/fuzz/native/decoder_fuzzer.cpp" "$root/native/decoder.cpp" \
    -o "$out/decoder_fuzzer"
clang++ "${flags[@]}" -pthread "$root/tests/fuzz/native/topk_fuzzer.cpp" "$root/native/topk.cpp" \
    -o "$out/topk_fuzzer"
echo "built $out/decoder_fuzzer $out/topk_fuzzer"
