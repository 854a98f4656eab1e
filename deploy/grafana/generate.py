#!/usr/bin/env python3
"""Generates the auditstream Grafana dashboard (deploy/grafana/auditstream.json).

The JSON is checked in; edit this file and rerun it, never the JSON:

    deploy/grafana/generate.py          # write auditstream.json
    deploy/grafana/generate.py --check  # exit 1 if the checked-in JSON differs

scripts/check-deploy runs --check, parses every query with promtool, checks
that every auditstream_* metric named here exists in the Rust code (or is on
the planned list below) and, when a binary is at hand, that the queries return
data from a running pipeline. Stdlib only.

Variables: $datasource (a Prometheus) and $namespace (the Kubernetes
namespace; `.*` matches series without the label, e.g. outside Kubernetes).
Consumer lag comes from the roles themselves: auditstream_consumer_lag
{group, topic, partition}, each replica reporting the partitions it is
assigned, so it is always summed over replicas.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = HERE / "auditstream.json"

# Metrics the dashboard shows that the code does not export yet: the checks
# tolerate their absence from the code and from a running binary (and say so).
# Empty: every metric the dashboard uses is exported.
PLANNED_METRICS: list[str] = []

NS = 'namespace=~"$namespace"'
RI = "$__rate_interval"
DS = {"type": "prometheus", "uid": "${datasource}"}
# Label matchers used in f-strings (no backslashes there before Python 3.12).
ACCEPTED = 'outcome="accepted"'
DEAD_LETTERED = 'outcome="dead_lettered"'
DELIVERED = 'outcome="delivered"'
FAILED = 'outcome="failed"'
NOT_ACCEPTED = 'outcome!="accepted"'
RETRIED = 'outcome="retried"'
BUSY = 'reason="busy"'
GROUPS = {
    "router": "auditstream-router",
    "deliverer": "auditstream-deliverer",
    "relay": "auditstream-destination-audits",
}
# One consumer group per retry rung: auditstream-deliverer-retry-<n>.
RETRY_GROUPS = 'group=~"auditstream-deliverer-retry-[0-9]+"'
LAG_GROUPS = f'group=~"{GROUPS["router"]}|{GROUPS["deliverer"]}"'


def sel(metric: str, *matchers: str) -> str:
    """`metric{namespace=~"$namespace", matchers...}`."""
    return f"{metric}{{{', '.join((NS,) + matchers)}}}"


def rate(metric: str, *matchers: str) -> str:
    return f"rate({sel(metric, *matchers)}[{RI}])"


def quantiles(histogram: str, by: str = "", qs: tuple = ("0.5", "0.9", "0.99")) -> list:
    """Quantiles (default p50, p90, p99) of a histogram, optionally split by one label."""
    out = []
    for q in qs:
        labels = f"le, {by}" if by else "le"
        legend = f"p{round(float(q) * 100)}" + (f" {{{{{by}}}}}" if by else "")
        out.append((f"histogram_quantile({q}, sum by ({labels}) ({rate(histogram + '_bucket')}))", legend))
    return out


def lag(group: str, by: str = "topic") -> str:
    # Summed over the replicas: each reports only its own partitions.
    matcher = RETRY_GROUPS if group == "retry" else 'group="' + GROUPS[group] + '"'
    return f"sum by ({by}) ({sel('auditstream_consumer_lag', matcher)})"


class Dashboard:
    def __init__(self) -> None:
        self.panels: list = []
        self.next_id = 1
        self.y = 0
        self.x = 0
        self.row_height = 0

    def _id(self) -> int:
        i = self.next_id
        self.next_id += 1
        return i

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "id": self._id(),
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_height
            self.x = 0
            self.row_height = 0

    def _place(self, w: int, h: int) -> dict:
        if self.x + w > 24:
            self._newline()
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_height = max(self.row_height, h)
        return pos

    def panel(self, kind: str, title: str, description: str, targets: list, unit: str, w: int = 8, h: int = 8, **extra) -> None:
        panel = {
            "type": kind,
            "id": self._id(),
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": self._place(w, h),
            "targets": [
                {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend, "range": True}
                for i, (expr, legend) in enumerate(targets)
            ],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        }
        if kind == "timeseries":
            panel["fieldConfig"]["defaults"]["custom"] = {"fillOpacity": 10, "lineWidth": 1, "showPoints": "never"}
            panel["options"] = {
                "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"]},
                "tooltip": {"mode": "multi", "sort": "desc"},
            }
        elif kind == "stat":
            panel["options"] = {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "value",
                "graphMode": "area",
                "textMode": "auto",
            }
        panel.update(extra)
        self.panels.append(panel)


def build() -> dict:
    d = Dashboard()
    thresholds_zero_good = {
        "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None}, {"color": "red", "value": 1}]}
    }

    d.row("Overview")
    d.panel(
        "stat", "Events accepted", "Events the producer API accepted (Kafka acknowledged), per second.",
        [(f"sum({rate('auditstream_producer_events_total', ACCEPTED)}) or vector(0)", "accepted/s")],
        "ops", w=4, h=5,
    )
    d.panel(
        "stat", "Deliveries delivered", "Deliveries a destination answered with 2xx, per second.",
        [(f"sum({rate('auditstream_deliverer_deliveries_total', DELIVERED)}) or vector(0)", "delivered/s")],
        "ops", w=4, h=5,
    )
    d.panel(
        "stat", "Dead letters (1 h)",
        "Events (router) and deliveries (deliverer) written to a dead-letter topic in the last hour. Anything above 0 needs a look: docs/OPERATIONS.md#dead-letters.",
        [
            (f"sum(increase({sel('auditstream_router_events_total', DEAD_LETTERED)}[1h])) or vector(0)", "events"),
            (f"sum(increase({sel('auditstream_deliverer_deliveries_total', DEAD_LETTERED)}[1h])) or vector(0)", "deliveries"),
        ],
        "short", w=4, h=5, **{"fieldConfig": {"defaults": {"unit": "short", **thresholds_zero_good}, "overrides": []}},
    )
    d.panel(
        "stat", "Consumer lag", "Messages not yet processed by the router and the deliverer (auditstream_consumer_lag, summed over replicas). The retry group is not counted: its lag is the retry schedule.",
        [(f"sum({sel('auditstream_consumer_lag', LAG_GROUPS)})", "lag")],
        "short", w=4, h=5,
    )
    d.panel(
        "stat", "Open circuits", "Destinations whose circuit breaker is open, worst deliverer.",
        [("max(auditstream_deliverer_circuit_open{" + NS + "})", "open")],
        "short", w=4, h=5, **{"fieldConfig": {"defaults": {"unit": "short", **thresholds_zero_good}, "overrides": []}},
    )
    d.panel(
        "stat", "Targets up", "Scraped auditstream processes that answer, by job (one job per role on Kubernetes).",
        [(f'sum by (job) (up{{job=~".*auditstream.*", {NS}}})', "{{job}}")],
        "short", w=4, h=5,
    )

    d.row("Producer")
    d.panel(
        "timeseries", "Events by outcome",
        "accepted: acknowledged by Kafka; invalid: refused with 422; unavailable: Kafka did not acknowledge in time (503).",
        [(f"sum by (outcome) ({rate('auditstream_producer_events_total')})", "{{outcome}}")],
        "ops",
    )
    d.panel(
        "timeseries", "API requests by route and status", "HTTP requests to the producer API.",
        [(f"sum by (route, status) ({rate('auditstream_producer_requests_total')})", "{{route}} {{status}}")],
        "reqps",
    )
    d.panel(
        "timeseries", "Producer errors", "Share of events refused: invalid (the publisher's fault) and unavailable (Kafka's).",
        [
            (
                f"sum by (outcome) ({rate('auditstream_producer_events_total', NOT_ACCEPTED)})"
                f" / scalar(sum({rate('auditstream_producer_events_total')}))",
                "{{outcome}}",
            )
        ],
        "percentunit",
    )
    d.panel(
        "timeseries", "API request latency", "Time to answer a request, including Kafka's acknowledgement.",
        quantiles("auditstream_producer_request_duration_seconds"), "s",
    )
    d.panel(
        "timeseries", "Kafka produce latency", "Time from handing a record to librdkafka until Kafka acknowledged it (acks=all).",
        quantiles("auditstream_producer_kafka_produce_seconds"), "s",
    )
    d.panel(
        "timeseries", "Requests refused busy",
        "Requests answered 503 busy: the producer was at api.max_in_flight requests at once. Sustained while Kafka acknowledges: add producer replicas (AuditstreamProducerSaturated).",
        [(f"sum({rate('auditstream_producer_rejected_events_total', BUSY)})", "busy")],
        "reqps",
    )
    d.panel(
        "timeseries", "Destination changes' audit events",
        "The relay publishes the audit event each destination change carries in its audit.destinations record. published: in audit.events; dead_lettered: not a valid event of a change of that destination, parked in audit.events.dlq.",
        [(f"sum by (outcome) ({rate('auditstream_producer_destination_audits_total')})", "{{outcome}}")],
        "ops", w=12,
    )
    d.panel(
        "timeseries", "Destination audit relay lag",
        "Destination records whose audit event is not yet published (auditstream_consumer_lag of the relay's group). Above zero for minutes: audit events are withheld.",
        [(lag("relay"), "{{topic}}")],
        "short", w=12,
    )

    d.row("Router")
    d.panel(
        "timeseries", "Events by outcome",
        "routed: at least one delivery; unrouted: no destination wanted it; not_streamed: the event is not streamed; dead_lettered: unreadable, sent to audit.events.dlq.",
        [(f"sum by (outcome) ({rate('auditstream_router_events_total')})", "{{outcome}}")],
        "ops",
    )
    d.panel(
        "timeseries", "Deliveries created by level", "One delivery per (event, destination), instance- or group-level.",
        [(f"sum by (level) ({rate('auditstream_router_deliveries_total')})", "{{level}}")],
        "ops",
    )
    d.panel(
        "timeseries", "Root resolution", "How the router found each event's root group: tree (namespace table), path, instance_scope; unknown, cycle and too_deep mean the namespace tree is incomplete or broken.",
        [(f"sum by (via) ({rate('auditstream_router_root_resolution_total')})", "{{via}}")],
        "ops",
    )
    d.panel(
        "timeseries", "Table entries", "Namespaces and destinations held in memory (largest router).",
        [(f"max by (table) ({sel('auditstream_router_table_entries')})", "{{table}}")],
        "short",
    )
    d.panel(
        "timeseries", "Router consumer lag", "Events not yet routed, by topic (auditstream-router group, summed over replicas).",
        [(lag("router"), "{{topic}}")],
        "short",
    )
    d.panel(
        "timeseries", "Router rewrites", "Records written again because Kafka refused them or the producer queue was full; the event's offset waits for them. Above zero for long: Kafka is unhealthy.",
        [(f"sum({rate('auditstream_router_rewrites_total')})", "rewrites")],
        "ops",
    )
    d.panel(
        "timeseries", "Events completed by the router", "Events a service wrote to Kafka itself without some fields of the schema, or with created_at in another RFC 3339 form: the router completed them (null fields, created_at in UTC with milliseconds) before delivery. Harmless; names publishers that skip the client library.",
        [(f"sum({rate('auditstream_router_events_completed_total')})", "completed")],
        "ops",
    )

    d.row("Deliverer")
    d.panel(
        "timeseries", "Deliveries by outcome",
        "delivered: 2xx; retried: moved to the next retry topic; dead_lettered: retries exhausted, sent to audit.deliveries.dlq; dropped: destination deleted.",
        [(f"sum by (outcome) ({rate('auditstream_deliverer_deliveries_total')})", "{{outcome}}")],
        "ops",
    )
    d.panel(
        "timeseries", "Attempts by status class", "HTTP attempts; class none means no answer (connect error, timeout, refused address).",
        [(f"sum by (outcome, class) ({rate('auditstream_deliverer_attempts_total')})", "{{outcome}} {{class}}")],
        "reqps",
    )
    d.panel(
        "timeseries", "Attempt error ratio", "Failed attempts over all attempts (alert above 20%).",
        [
            (
                # 0 rather than no data while nothing fails.
                f"(sum({rate('auditstream_deliverer_attempts_total', FAILED)}) or vector(0))"
                f" / sum({rate('auditstream_deliverer_attempts_total')})",
                "failed",
            )
        ],
        "percentunit",
    )
    d.panel(
        "timeseries", "Delivery latency (event created → 2xx)",
        "From the event's created_at to the destination's 2xx, retries included.",
        quantiles("auditstream_deliverer_delivery_latency_seconds"), "s", w=12,
    )
    d.panel(
        "timeseries", "Destination attempt time",
        "Time one HTTP attempt to a destination took, from sending the request to reading the response, failed attempts included (p50, p99). A rising p99 means slow destinations, which hold deliverer.max_in_flight places longer.",
        quantiles("auditstream_deliverer_attempt_duration_seconds", qs=("0.5", "0.99")), "s", w=12,
    )
    d.panel(
        "timeseries", "Open circuits by pod", "Destinations with an open circuit breaker, per deliverer.",
        [(f"sum by (pod) ({sel('auditstream_deliverer_circuit_open')})", "{{pod}}")],
        "short", w=12,
    )
    d.panel(
        "timeseries", "Deliverer consumer lag", "Deliveries not yet attempted, by topic (auditstream-deliverer group, summed over replicas).",
        [(lag("deliverer"), "{{topic}}")],
        "short", w=12,
    )
    d.panel(
        "timeseries", "Connections opened to destinations", "New connections to destinations per second, by protocol. Kept-alive connections are reused, so a steady rate near the delivery rate means destinations close them after every response (or idle ones time out: deliverer.idle_connection_timeout). \"resent\": requests sent again on another connection because the one they were given closed before writing them, a kept-alive one as it was reused or a new one reset at once (not duplicates; a rate above zero usually means a destination closes idle connections sooner than deliverer.idle_connection_timeout).",
        [
            (f"sum by (protocol) ({rate('auditstream_deliverer_connections_opened_total')})", "{{protocol}}"),
            (f"sum ({rate('auditstream_deliverer_requests_resent_total')})", "resent"),
        ],
        "ops", w=12,
    )
    d.panel(
        "timeseries", "Open connections by pod", "Connections to destinations each deliverer holds open, idle or busy (over HTTP/1.1 one per attempt in flight to an origin at its peak, until idle ones time out; over HTTP/2 one per origin).",
        [(f"sum by (pod) ({sel('auditstream_deliverer_connections_open')})", "{{pod}}")],
        "short", w=12,
    )

    d.row("Retries and dead letters")
    d.panel(
        "timeseries", "Moved down the retry ladder", "Deliveries written to a retry topic, per second.",
        [(f"sum({rate('auditstream_deliverer_deliveries_total', RETRIED)}) or vector(0)", "retried")],
        "ops",
    )
    d.panel(
        "timeseries", "Retry backlog by rung", "Deliveries waiting in each retry topic (groups auditstream-deliverer-retry-N, one per rung). Waiting is normal: each rung holds its messages until due.",
        [(lag("retry"), "{{topic}}")],
        "short",
    )
    d.panel(
        "timeseries", "Held for their retry, by rung", "Deliveries a deliverer has read from a retry topic and holds until due, by rung (newer builds).",
        [(f"sum by (rung) ({sel('auditstream_deliverer_retry_waiting')})", "rung {{rung}}")],
        "short",
    )
    d.panel(
        "timeseries", "Dead letters", "Written to a dead-letter topic, per second: audit.events.dlq (router) and audit.deliveries.dlq (deliverer).",
        [
            (f"sum({rate('auditstream_router_events_total', DEAD_LETTERED)}) or vector(0)", "audit.events.dlq"),
            (f"sum({rate('auditstream_deliverer_deliveries_total', DEAD_LETTERED)}) or vector(0)", "audit.deliveries.dlq"),
        ],
        "ops",
    )

    return {
        "__inputs": [],
        "annotations": {"list": []},
        "description": "auditstream: producer → router → deliverer. Generated by deploy/grafana/generate.py.",
        "editable": True,
        "graphTooltip": 1,
        "links": [],
        "panels": d.panels,
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["auditstream", "kafka"],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                },
                {
                    "name": "namespace",
                    "label": "Namespace",
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": "label_values(auditstream_producer_events_total, namespace)", "refId": "namespace"},
                    "definition": "label_values(auditstream_producer_events_total, namespace)",
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                    "sort": 1,
                    "hide": 0,
                },
            ]
        },
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "auditstream",
        "uid": "auditstream",
        "version": 1,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    text = render()
    if sys.argv[1:] == ["--check"]:
        if not TARGET.exists() or TARGET.read_text(encoding="utf-8") != text:
            print(f"{TARGET} differs from the generator's output: run deploy/grafana/generate.py", file=sys.stderr)
            return 1
        return 0
    if sys.argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    TARGET.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
