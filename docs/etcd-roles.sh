#!/bin/sh
# Creates the etcd users and roles of a pgmtls installation and turns authentication on.
#
#   PGMTLS_PREFIX=/pgmtls ROOT_PW=... OPERATOR_PW=... REPLICA_PW=... sh docs/etcd-roles.sh
#
# Uses etcdctl (API 3, etcd 3.4 syntax) with ETCDCTL_ENDPOINTS / --endpoints from the
# environment; against an https:// etcd also ETCDCTL_CACERT, and with --client-cert-auth
# ETCDCTL_CERT / ETCDCTL_KEY (a root client certificate). pgmtls then names the same files in
# etcd.ca_file / etcd.cert_file / etcd.key_file (state import: --etcd-ca-file and so on). With
# --client-cert-auth and no password given, etcd takes the user from the certificate's CN: a
# replica certificate with CN pgmtls-replica gets the replica role without a password_file
# (etcd's documented behaviour; not exercised by the tests). After it runs:
#   operator  reads and writes PREFIX/ (state import/export, the CLI, secrets/, audit/)
#   replica   reads PREFIX/databases/, reads and writes PREFIX/replicas/ only (its registry
#             entry, and the others' entries: where a fleet replica forwards cancels);
#             PREFIX/secrets/ (ca.key, client.key) and PREFIX/audit/ are "permission denied".
set -eu
: "${PGMTLS_PREFIX:=/pgmtls}"
: "${ROOT_PW:?give ROOT_PW}" "${OPERATOR_PW:?give OPERATOR_PW}" "${REPLICA_PW:?give REPLICA_PW}"
P="${PGMTLS_PREFIX%/}"
export ETCDCTL_API=3

etcdctl user add "root:$ROOT_PW"
etcdctl user grant-role root root

etcdctl role add pgmtls-operator
etcdctl role grant-permission pgmtls-operator --prefix=true readwrite "$P/"
etcdctl user add "pgmtls-operator:$OPERATOR_PW"
etcdctl user grant-role pgmtls-operator pgmtls-operator

etcdctl role add pgmtls-replica
etcdctl role grant-permission pgmtls-replica --prefix=true read "$P/databases/"
etcdctl role grant-permission pgmtls-replica --prefix=true readwrite "$P/replicas/"
etcdctl user add "pgmtls-replica:$REPLICA_PW"
etcdctl user grant-role pgmtls-replica pgmtls-replica

etcdctl auth enable
