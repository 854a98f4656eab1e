#!/bin/sh
# Creates every auditstream topic on the compose broker (one broker:
# replication factor 1) and seeds one instance-level destination pointing at
# the compose receiver. Idempotent: rerunning changes nothing.
# Runs in the apache/kafka image (POSIX sh). scripts/check-deploy checks the
# topic list against proto/src/topics.rs and the retry delays.
set -eu

bootstrap="${BOOTSTRAP:-kafka:9092}"
bin=/opt/kafka/bin
day=86400000

create() { # name partitions config...
  name="$1"; partitions="$2"; shift 2
  set -- "$@" --config min.insync.replicas=1
  "$bin/kafka-topics.sh" --bootstrap-server "$bootstrap" --create --if-not-exists \
    --topic "$name" --partitions "$partitions" --replication-factor 1 "$@"
}

stream() { create "$1" "$2" --config cleanup.policy=delete --config "retention.ms=$3" --config max.message.bytes=2097152; }
# Tables keep every record a day before compaction (the producer's relay
# reads the audit event each destination record carries).
table() { create "$1" "$2" --config cleanup.policy=compact --config delete.retention.ms=$day --config min.compaction.lag.ms=$day; }

stream audit.events 4 $((7 * day))
table audit.namespaces 3
table audit.destinations 3
stream audit.deliveries 4 $((7 * day))
for n in 0 1 2 3 4 5 6; do
  stream "audit.deliveries.retry.$n" 4 $((7 * day))
done
stream audit.events.dlq 3 $((30 * day))
stream audit.deliveries.dlq 3 $((30 * day))

# One instance-level destination (receives every streamed event): the
# compose receiver. Key | JSON value, as the destinations topic stores it.
printf '%s|%s\n' compose-receiver \
  '{"id":"compose-receiver","owner":{"kind":"instance"},"name":"compose-receiver","url":"http://receiver:8081/instance","verification_token":"compose-token-000001"}' |
  "$bin/kafka-console-producer.sh" --bootstrap-server "$bootstrap" --topic audit.destinations \
    --property parse.key=true --property key.separator='|'

"$bin/kafka-topics.sh" --bootstrap-server "$bootstrap" --list
echo "topic-init: done"
