#!/usr/bin/env bash
# Build the C accelerator with AddressSanitizer and UndefinedBehaviorSanitizer
# and run the unit tests that call it (the differential tests among them).
# Any memory error or undefined behaviour aborts the run (PYTHONMALLOC=malloc
# gives every Python object an allocation of its own, which ASan guards).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${TLSPROXY_VENV:-.venv}/bin/python
suffix=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
include=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
built=tlsproxy/_speedups$suffix
saved=$(mktemp)
if [ -e "$built" ]; then cp "$built" "$saved"; fi
reports=$(mktemp -d)
restore() { if [ -s "$saved" ]; then cp "$saved" "$built"; else rm -f "$built"; fi; rm -rf "$saved" "$reports"; }
trap restore EXIT
gcc -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined \
  -Wall -Wextra -Wno-unused-parameter -Werror -fPIC -shared -I"$include" tlsproxy/_speedups.c -o "$built"
# Reports go to files: pytest captures stderr, and an aborted run cannot print it.
status=0
ASAN_OPTIONS="detect_leaks=0:log_path=$reports/asan" UBSAN_OPTIONS="print_stacktrace=1:log_path=$reports/ubsan" \
PYTHONMALLOC=malloc LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
  "$py" -m pytest -p no:cacheprovider -q tests/unit/test_speedups.py tests/unit/test_wire.py \
  tests/unit/test_http_server.py tests/unit/test_proxy_handler.py tests/unit/test_headers.py "$@" || status=$?
if compgen -G "$reports/*" >/dev/null; then
  echo "sanitize: the sanitizers reported:" >&2
  cat "$reports"/* >&2
  status=1
fi
exit "$status"
