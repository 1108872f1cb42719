#!/usr/bin/env bash
# Install everything the tests need, then run the checks and the whole suite.
# Idempotent and quick when everything is already there. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use: the real etcd binary, docker-compose (validates
# docker-compose.yml), a third-party STUN client, iproute2 and iptables (the
# network-namespace lab), promtool (alert rules) and chromium (the dashboard,
# driven by Playwright: no browser download). Installed when missing and we are root (CI is);
# otherwise the tests that need them skip and say why.
need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server etcd-client)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v stun >/dev/null 2>&1 || need+=(stun-client)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)  # promtool checks deploy/alerts.yml
command -v chromium >/dev/null 2>&1 || need+=(chromium)    # the dashboard's browser tests
if ((${#need[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing ${need[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    else
        echo "not installing ${need[*]} (needs root and apt-get); tests that need them will skip" >&2
    fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/pytest "$@"
