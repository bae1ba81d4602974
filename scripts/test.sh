#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian machine, then run them all.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(pebble nginx-light haproxy apache2-utils wrk nghttp2-client openssl curl chromium libnss3-tools ca-certificates procps redis-server)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  echo "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

venv=$(realpath -m "${TLSPROXY_VENV:-.venv}")
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip "setuptools>=77" >/dev/null
# A plain (not editable) install: the integration tests run the installed `twist tlsproxy`.
"$venv/bin/pip" install -q --force-reinstall --no-deps . >/dev/null
"$venv/bin/pip" install -q -c constraints.txt '.[test]' >/dev/null

# The Mozilla compliance scanner pins its own cryptography: it gets a venv of its own.
if [ ! -x .venv-sslyze/bin/sslyze ]; then
  python3 -m venv .venv-sslyze
  .venv-sslyze/bin/pip install -q sslyze >/dev/null
fi
export SSLYZE_BIN="$PWD/.venv-sslyze/bin/sslyze"

"$venv/bin/ruff" check tlsproxy twisted tests bench
"$venv/bin/ruff" format --check tlsproxy twisted tests bench
"$venv/bin/mypy" tlsproxy
# The C accelerator must be built (a fresh Debian machine has gcc): in the
# installed package, and in place, because pytest imports tlsproxy from this
# tree. Its pure Python fallback gets the unit tests on its own.
"$venv/bin/python" setup.py -q build_ext --inplace >/dev/null
(cd / && "$venv/bin/python" -c "import tlsproxy._speedups")
"$venv/bin/python" -c "import tlsproxy._speedups"
TLSPROXY_PURE_PYTHON=1 "$venv/bin/python" -m pytest -p no:cacheprovider -q tests/unit
# ... and the C code runs its tests once more under ASan and UBSan.
TLSPROXY_VENV="$venv" bash scripts/sanitize.sh
# The whole suite, under coverage (of this process: the proxies the integration
# tests start run uncounted). The full table is left in coverage.txt.
"$venv/bin/python" -m coverage run -m pytest -p no:cacheprovider "$@"
"$venv/bin/python" -m coverage report --sort=cover > coverage.txt || true
echo "coverage of tlsproxy (in-process tests): $(tail -n 1 coverage.txt | awk '{print $NF}'), per module in coverage.txt"
