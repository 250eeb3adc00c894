#!/usr/bin/env bash
# The package on a booted system, as an operator meets it: a minimal Debian 12 root made with mmdebstrap, booted
# with systemd-nspawn (its own network namespace: only its loopback), the .deb installed with apt. Then:
#   the target and both services active and enabled; a device connects and is acknowledged; `reload` works, and
#   fails visibly on a bad certificate; `stop thingport.target` stops the gateway before the worker and returns only
#   when both have stopped; `restart` keeps what the store keeps; `purge` leaves no file and no user.
#
#   packaging/test-booted.sh target/debian/thingport_VERSION-1_amd64.deb
#
# Needs root, mmdebstrap and systemd-nspawn (Debian: mmdebstrap, systemd-container) and Debian's archive for the
# root (cached in $THINGPORT_BOOTED_DIR, default target/booted). On a host without systemd as PID 1 the container
# runs in this process's cgroup (--register=no --keep-unit). Exits 77 when the container cannot boot here.
set -euo pipefail
deb=$(realpath "${1:?usage: $0 PACKAGE.deb}")
cd "$(dirname "$0")/.."
work=$(realpath -m "${THINGPORT_BOOTED_DIR:-target/booted}")
mkdir -p "$work"
root=$work/root
tarball=$work/bookworm-minbase.tar

if [ ! -s "$tarball" ]; then
    echo "== a minimal Debian 12 root (mmdebstrap)"
    # procps is downloaded, not installed: apt must find it because the package depends on it (its /bin/kill
    # reloads the gateway), in a container that cannot reach the archive
    mmdebstrap --variant=minbase --include=systemd,systemd-sysv,dbus,curl,ca-certificates \
        --skip=cleanup/apt/lists,cleanup/apt/cache \
        --customize-hook='chroot "$1" apt-get install --download-only -y -qq procps' \
        bookworm "$work/partial.tar" >"$work/mmdebstrap.log" 2>&1 || { tail -20 "$work/mmdebstrap.log"; exit 1; }
    mv "$work/partial.tar" "$tarball"
fi
rm -rf "$root"
mkdir -p "$root"
tar -C "$root" -xf "$tarball"
cp "$deb" "$root/root/thingport.deb"

echo "== booting it (systemd-nspawn --boot)"
systemd-nspawn --boot --register=no --keep-unit --private-network --console=passive \
    --machine=thingport-test -D "$root" >"$work/console.log" 2>&1 &
nspawn=$!
leader=""
stop_container() {
    if [ -n "$leader" ] && kill -0 "$leader" 2>/dev/null; then
        kill -RTMIN+4 "$leader" 2>/dev/null || true # systemd: power off
        for _ in $(seq 100); do kill -0 "$nspawn" 2>/dev/null || break; sleep 0.1; done
    fi
    kill "$nspawn" 2>/dev/null || true
    wait "$nspawn" 2>/dev/null || true
    rm -rf "$root"
}
trap stop_container EXIT
# the container's PID 1: nspawn's child once it has become systemd
for _ in $(seq 200); do
    leader=$(pgrep -P "$nspawn" | head -1 || true)
    [ -n "$leader" ] && [ "$(cat "/proc/$leader/comm" 2>/dev/null)" = systemd ] && break
    leader=""
    kill -0 "$nspawn" 2>/dev/null || break
    sleep 0.1
done
in_ct() {
    nsenter --target "$leader" --mount --uts --ipc --net --pid -- \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"
}
# `systemctl` fails until systemd has made its sockets: ask again until the boot has finished, for up to 60 s
state=""
for _ in $(seq 120); do
    [ -n "$leader" ] || break
    state=$(timeout 60 nsenter --target "$leader" --mount --pid -- \
        /usr/bin/systemctl is-system-running --wait 2>/dev/null || true)
    case "$state" in running | degraded) break ;; esac
    sleep 0.5
done
case "$state" in
    running | degraded) echo "booted: $state" ;;
    *)
        echo "skipped: the container did not boot here (state '${state:-none}'); console:"
        tail -20 "$work/console.log"
        exit 77
        ;;
esac

failures=0
check() {
    local what=$1
    shift
    if "$@"; then echo "ok: $what"; else echo "FAILED: $what"; failures=$((failures + 1)); fi
}
# tries a command until it succeeds, for up to 30 s
eventually() {
    local end=$((SECONDS + 30))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$end" ] || return 1
        sleep 0.1
    done
}
units=(thingport.target thingport-gateway.service thingport-foundation@1.service)
active() { in_ct systemctl is-active --quiet "${units[@]}"; }
enabled() { [ "$(in_ct systemctl is-enabled "${units[@]}" | sort -u)" = enabled ]; }
api() { in_ct curl -sf --cacert /etc/thingport/tls/cert.pem -H "x-api-key: $(in_ct cat /etc/thingport/admin-api-key)" "$@"; }
device_acked() {
    in_ct sh -c 'thingport-gateway token issue --thing booted- --count 1 --secret-file /etc/thingport/provisioning.key \
        > /root/tokens && thingport-loadtest run --target 127.0.0.1:8443 --ca /etc/thingport/tls/cert.pem \
        --tokens /root/tokens --rate 10 --duration 2s --json --quiet' >"$work/device.json" || return 1
    local sent acked
    sent=$(grep -o '"sent":[0-9]*' "$work/device.json" | cut -d: -f2)
    acked=$(grep -o '"acked":[0-9]*' "$work/device.json" | cut -d: -f2)
    [ "${acked:-0}" -gt 0 ] && [ "$acked" = "$sent" ]
}

echo "== install (apt)"
check "apt installs the package offline, with its dependencies" \
    in_ct apt-get install -y -qq --no-install-recommends /root/thingport.deb
check "the target and both services become active" eventually active
check "the target and both services are enabled" enabled
check "a device connects and each of its messages is acknowledged" eventually device_acked
mode() { in_ct stat -c '%a %U:%G' "/etc/thingport/pool/$1"; }
check "postinst made the pool's credentials, the CA's key root's alone" \
    test "$(mode ca.key)/$(mode node.key)/$(mode swim.key)/$(mode ca.pem)" = \
    "600 root:root/640 root:thingport/640 root:thingport/644 root:thingport"
hashed_keys() {
    in_ct grep -q '^sha256:[0-9a-f]\{64\} role=admin name=admin$' /etc/thingport/api-keys &&
        ! in_ct grep -qF "$(in_ct cat /etc/thingport/admin-api-key)" /etc/thingport/api-keys &&
        [ "$(in_ct stat -c '%a %U' /etc/thingport/admin-api-key)" = "600 root" ]
}
check "the API keys file holds the admin key's hash, the key itself is root's alone" hashed_keys
plain_refused() { ! in_ct curl -sf -m 5 http://127.0.0.1:8080/v1/cluster >/dev/null 2>&1 && api https://127.0.0.1:8080/v1/cluster >/dev/null; }
check "the packaged API answers HTTPS, not plain HTTP" plain_refused
tls_links() { in_ct journalctl -u thingport-gateway.service -o cat | grep -q "link up"; }
check "the gateway's links (mutual TLS with the pool's credentials) are up" tls_links

echo "== reload"
check "systemctl reload thingport-gateway succeeds" in_ct systemctl reload thingport-gateway
in_ct cp /etc/thingport/tls/cert.pem /root/cert.pem.good
in_ct sh -c 'echo "not a certificate" > /etc/thingport/tls/cert.pem'
refused_reload() { ! in_ct systemctl reload thingport-gateway 2>/dev/null; }
check "a reload with a bad certificate fails (non-zero exit)" refused_reload
named() { in_ct journalctl -u thingport-gateway.service -o cat | grep -q "tls.cert, tls.key"; }
check "... and the journal names the problem" named
in_ct cp /root/cert.pem.good /etc/thingport/tls/cert.pem
check "the gateway still serves with the certificate it had" device_acked

echo "== restart keeps what the store keeps"
written() {
    api -X PUT -H 'content-type: application/json' -d '{"value": 42}' \
        https://127.0.0.1:8080/v1/things/booted-0/properties/setpoint >/dev/null
}
check "an application writes a property" written
check "systemctl restart thingport.target" in_ct systemctl restart thingport.target
check "everything is active again" eventually active
kept() { api https://127.0.0.1:8080/v1/things/booted-0/properties/setpoint | grep -q '"value":42'; }
check "the property is there after the restart" eventually kept

echo "== stop drains the gateway before the worker, and waits"
check "systemctl stop thingport.target" in_ct systemctl stop thingport.target
stopped() {
    ! in_ct systemctl is-active --quiet thingport-gateway.service &&
        ! in_ct systemctl is-active --quiet thingport-foundation@1.service
}
check "both services had stopped when stop returned" stopped
mono() { in_ct systemctl show -p "$1" --value "$2"; }
gateway_down=$(mono InactiveEnterTimestampMonotonic thingport-gateway.service)
worker_stopping=$(mono ActiveExitTimestampMonotonic thingport-foundation@1.service)
check "the gateway had stopped ($gateway_down) before the worker began to stop ($worker_stopping)" \
    test "$gateway_down" -le "$worker_stopping"
drained() { in_ct journalctl -u thingport-gateway.service -o cat | grep -q drained; }
check "the gateway logged the end of its drain" drained

echo "== purge"
check "apt purges the package" in_ct apt-get purge -y -qq thingport
left=$(in_ct sh -c 'ls -d /etc/thingport /var/lib/thingport /usr/share/doc/thingport 2>/dev/null;
    find /etc/systemd /usr/lib/systemd -name "thingport*" 2>/dev/null; getent passwd thingport; getent group thingport' ||
    true)
check "nothing is left (files, unit links, user, group)${left:+: $left}" test -z "$left"

if [ "$failures" -gt 0 ]; then
    echo "$failures check(s) failed; the container's journal:"
    in_ct journalctl -b --no-pager -u 'thingport*' | tail -60 || true
    exit 1
fi
echo "every check passed"
