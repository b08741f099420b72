#!/usr/bin/env bash
# Build examples/c/embed_allreduce.c against the installed hetcomm and run it:
# SIZE ranks (default 4) in two sites of equal size, all on this host.
#   examples/c/run.sh [SIZE] [BUILD_DIR]
# PYTHON picks the interpreter whose hetcomm to use (default: python3).
set -euo pipefail
size=${1:-4}
out=${2:-$(mktemp -d)}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)

inc=$("$py" -c 'import hetcomm; print(hetcomm.get_include())')
lib=$("$py" -c 'import hetcomm; print(hetcomm.get_library_dir())')
# A C program has no pyzmq to borrow libzmq from: point it at the copy inside the pyzmq wheel.
libzmq=$("$py" -c 'import glob, os, zmq; d = os.path.dirname(zmq.__file__)
print(os.path.realpath(sorted(glob.glob(os.path.join(d, "..", "pyzmq.libs", "libzmq*.so*")))[0]))')
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

mkdir -p "$out"
cc -O2 -Wall -Wextra -I"$inc" "$here/embed_allreduce.c" -L"$lib" -lhetcomm -Wl,-rpath,"$lib" -lm -pthread \
   -o "$out/embed_allreduce"

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
for ((r = 0; r < size; r++)); do
  "$out/embed_allreduce" "$r" "$size" "dc-$((r * 2 / size))" "127.0.0.1:$port" "$libzmq" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
trap - EXIT
exit $status
