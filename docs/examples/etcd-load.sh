#!/bin/sh
# Load a meduza snapshot (a flat JSON object {"/key": "value"}) into etcd, then bump
# /commit so every node converges. Default: the three-node example next to this script.
#
#   docs/examples/etcd-load.sh [SNAPSHOT.json]
#
# etcdctl reads its usual environment (ETCDCTL_ENDPOINTS, ETCDCTL_CACERT, ETCDCTL_CERT,
# ETCDCTL_KEY, ETCDCTL_USER, ...). Values are passed on stdin, never through the shell
# or the command line, so multi-line values (PEM keys, YAML) and values starting with
# "-" arrive byte for byte. /commit is written last, after every other key.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
snapshot=${1:-"$here/three-nodes.json"}
export ETCDCTL_API=3

command -v jq >/dev/null || { echo "etcd-load: jq is required" >&2; exit 1; }
command -v etcdctl >/dev/null || { echo "etcd-load: etcdctl is required" >&2; exit 1; }
jq -e 'type == "object" and ([.[] | type] | all(. == "string"))' "$snapshot" >/dev/null || {
    echo "etcd-load: $snapshot is not a flat JSON object of strings" >&2
    exit 1
}

# One key per line; keys never contain newlines (they are etcd paths).
jq -r 'keys[] | select(. != "/commit")' "$snapshot" | while IFS= read -r key; do
    # -j: the raw value without a trailing newline added, exactly as in the JSON.
    jq -j --arg k "$key" '.[$k]' "$snapshot" | etcdctl put -- "$key" >/dev/null
done

etcdctl put /commit "$(date +%s)" >/dev/null
echo "etcd-load: loaded $(jq -r 'keys | map(select(. != "/commit")) | length' "$snapshot") keys from $snapshot and bumped /commit"
