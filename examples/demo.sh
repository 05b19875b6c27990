#!/bin/sh
# The main job, end to end: a new network namespace served by pyslirp gets a
# DHCP lease and resolves a name through the DNS proxy at 10.0.2.3.
# Usage: examples/demo.sh [NAME] ; extra forwarder flags in $PYSLIRP_ARGS.
set -eu
name=${1:-example.org}
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d /tmp/pyslirp-demo.XXXXXX)
touch "$dir/net"
# shellcheck disable=SC2086
pyslirp-forwarder ${PYSLIRP_ARGS:-} "$dir/net" &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  umount "$dir/net" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM
tries=0
until nsenter --net="$dir/net" ip link show tap0 >/dev/null 2>&1; do
  tries=$((tries + 1)); [ "$tries" -lt 100 ] || { echo "forwarder did not start" >&2; exit 1; }
  sleep 0.1
done
nsenter --net="$dir/net" ip link set tap0 up
nsenter --net="$dir/net" udhcpc -i tap0 -f -q -n -t 5 -s "$here/udhcpc.script"
echo "resolving $name through 10.0.2.3:"
nsenter --net="$dir/net" dig +short +tries=2 +time=3 @10.0.2.3 "$name"
