"""A closed-loop load generator for any TF Serving `PredictionService` (`xdctr loadtest`).

`concurrency` threads each send one Predict request, wait for the answer, and send the next, until
`requests` requests have been sent or `duration_s` seconds have passed, whichever comes first. Both
bounds are required. No call outlives the time bound: each call's gRPC deadline is cut to the time
left, and a call cut that way counts as `unfinished`, not as an error.

With `rate_qps` the load is open-loop instead: request k is due at start + k / rate_qps, the
threads (at most `concurrency` calls in flight) send each when it is due, and its latency runs from
when it was due, so a server that falls behind shows it in the percentiles (no coordinated
omission) rather than lowering the rate.

Only loopback targets (`localhost`, 127.0.0.0/8, ::1, unix sockets) are accepted unless
`allow_remote=True` (`--allow-remote`), so a typo cannot load-test someone else's server.

Payloads come from serialized `tf.Example`s (a TFRecord file pattern on the command line):
- `serving_default`: `batch` examples per request, cycling through the examples;
- `score_candidates`: one context example plus `candidates` (item id, domain) pairs taken from the
  examples' target `item_id` and `domain` features.
Requests are built before the clock starts, so the client measures the service, not proto building;
`warmup` requests, sent before the clock starts, are not counted.

The result is a dict: QPS (successful requests per second), rows per second, p50/p95/p99/max
latency in ms of the successful requests, and errors counted by gRPC status code name (a refused
request is counted, never raised).
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import json
import math
import os
import threading
import time
from typing import Optional, Sequence

import grpc
import numpy as np

from xdctr import features as F

SIGNATURES = (F.SERVING_SIGNATURE, F.SCORE_CANDIDATES_SIGNATURE)
DEFAULT_REQUESTS = 1000
DEFAULT_DURATION_S = 30.0
DEFAULT_CONCURRENCY = 4
DEFAULT_BATCH = 1
DEFAULT_CANDIDATES = 100
DEFAULT_RPC_TIMEOUT_S = 10.0
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_MAX_EXAMPLES = 1000
MAX_DISTINCT_REQUESTS = 256  # prebuilt requests, reused in turn
PERCENTILES = (50, 95, 99)
LOOPBACK_NAMES = ("localhost",)
LOCAL_SCHEMES = ("unix:", "unix-abstract:")
RESOLVER_PREFIXES = ("dns:///", "dns:", "ipv4:", "ipv6:")
# Same limits as TF Serving and `xdctr serve`: a large batch must not fail at gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 2**31 - 1


def target_host(target: str) -> Optional[str]:
    """The host part of a gRPC target ("host:port", "[v6]:port", "dns:///host:port", "ipv4:a.b.c.d:port").

    Returns None for unix-socket targets, which are local by construction. Raises ValueError for a
    target without a port.
    """
    if target.startswith(LOCAL_SCHEMES):
        return None
    address = target
    for prefix in RESOLVER_PREFIXES:
        if address.startswith(prefix):
            address = address[len(prefix):]
            break
    address = address.split(",")[0]  # ipv4:/ipv6: may list several addresses; all must be checked by caller
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"loadtest target {target!r} must be HOST:PORT (e.g. localhost:8500 or [::1]:8500).")
    return host


def is_loopback(host: Optional[str]) -> bool:
    """True for unix sockets (None), `localhost` and loopback IP literals; names are not resolved."""
    if host is None or host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def check_target(target: str, allow_remote: bool = False) -> None:
    """Raises ValueError unless `target` is a loopback address or `allow_remote` is set."""
    addresses = [target]
    for prefix in ("ipv4:", "ipv6:"):
        if target.startswith(prefix):  # "ipv4:127.0.0.1:8500,10.0.0.1:8500" lists several
            addresses = [prefix + a for a in target[len(prefix):].split(",")]
    for address in addresses:
        host = target_host(address)
        if not allow_remote and not is_loopback(host):
            raise ValueError(
                f"loadtest target {target!r} is not a loopback address (localhost, 127.0.0.0/8, [::1], unix:); "
                "pass --allow-remote (allow_remote=True) to load-test another host."
            )


def read_examples(pattern: str, limit: int = DEFAULT_MAX_EXAMPLES) -> list[bytes]:
    """Up to `limit` serialized tf.Examples from TFRecord files matching `pattern` (`.gz`: GZIP)."""
    import tensorflow as tf

    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no TFRecord file matches {pattern!r}")
    examples = []
    for path in files:
        compression = "GZIP" if path.endswith(".gz") else ""
        for record in tf.data.TFRecordDataset(path, compression_type=compression).take(limit - len(examples)):
            examples.append(record.numpy())
        if len(examples) >= limit:
            break
    if not examples:
        raise ValueError(f"the TFRecord files matching {pattern!r} hold no records.")
    return examples


def _bytes_feature(serialized: bytes, name: str) -> Optional[bytes]:
    import tensorflow as tf

    values = tf.train.Example.FromString(serialized).features.feature[name].bytes_list.value
    return values[0] if values else None


def candidate_pool(examples: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    """Distinct (item id, domain) pairs of the examples' targets, in first-seen order."""
    pairs = {}
    for serialized in examples:
        item, domain = _bytes_feature(serialized, F.ITEM_ID), _bytes_feature(serialized, F.DOMAIN)
        if item and domain:
            pairs.setdefault((item, domain), None)
    if not pairs:
        raise ValueError(
            f"no example carries non-empty {F.ITEM_ID!r} and {F.DOMAIN!r} bytes features; "
            f"{F.SCORE_CANDIDATES_SIGNATURE} takes its candidates from them."
        )
    return list(pairs)


def build_requests(
    model_name: str,
    examples: Sequence[bytes],
    signature: str,
    batch: int,
    candidates: int,
    count: int,
    version: Optional[int] = None,
    version_label: Optional[str] = None,
) -> list:
    """`count` distinct PredictRequests for `signature`, cycling through `examples`."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    def strings(values):
        return tf.make_tensor_proto(list(values), dtype=tf.string, shape=[len(values)])

    pool = candidate_pool(examples) if signature == F.SCORE_CANDIDATES_SIGNATURE else []
    requests = []
    for k in range(count):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = signature
        if version is not None:
            request.model_spec.version.value = version
        elif version_label:
            request.model_spec.version_label = version_label
        if signature == F.SCORE_CANDIDATES_SIGNATURE:
            chosen = [pool[(k * candidates + j) % len(pool)] for j in range(candidates)]
            request.inputs[F.SERVING_INPUT].CopyFrom(strings([examples[k % len(examples)]]))  # (1,)
            request.inputs[F.CANDIDATE_ITEM_IDS].CopyFrom(strings([item for item, _ in chosen]))  # (N,)
            request.inputs[F.CANDIDATE_DOMAINS].CopyFrom(strings([domain for _, domain in chosen]))  # (N,)
        else:
            rows = [examples[(k * batch + j) % len(examples)] for j in range(batch)]
            request.inputs[F.SERVING_INPUT].CopyFrom(strings(rows))  # (batch,)
        request.output_filter.append(F.SERVING_OUTPUT)
        requests.append(request)
    return requests


class _Loop:
    """Shared state of the worker threads: the two bounds, the counters and the latencies."""

    def __init__(self, requests: int, start: float, duration_s: float, rate_qps: Optional[float] = None):
        self.limit = requests
        self.start = start
        self.deadline = start + duration_s
        self.interval = None if rate_qps is None else 1.0 / rate_qps
        self.lock = threading.Lock()
        self.sent = 0
        self.latencies_s: list[float] = []  # from when each request was due
        self.call_latencies_s: list[float] = []  # from when it was sent
        self.errors: collections.Counter = collections.Counter()
        self.first_error: dict[str, str] = {}
        self.unfinished = 0

    def claim(self) -> Optional[tuple[int, Optional[float]]]:
        """(index, time due) of the next request, or None once either bound is reached.

        Closed loop: due None (now). Open loop (`interval`): due at start + index * interval.
        """
        with self.lock:
            now = time.monotonic()
            due = None if self.interval is None else self.start + self.sent * self.interval
            if self.sent >= self.limit or max(now, due or now) >= self.deadline:
                return None
            self.sent += 1
            return self.sent - 1, due

    def record_ok(self, latency_s: float, call_latency_s: float) -> None:
        with self.lock:
            self.latencies_s.append(latency_s)
            self.call_latencies_s.append(call_latency_s)

    def record_error(self, code: grpc.StatusCode, details: str) -> None:
        with self.lock:
            self.errors[code.name] += 1
            self.first_error.setdefault(code.name, details)

    def record_unfinished(self) -> None:
        with self.lock:
            self.unfinished += 1


def _worker(channel: grpc.Channel, requests: list, loop: _Loop, rpc_timeout_s: float) -> None:
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        while (claimed := loop.claim()) is not None:
            index, due = claimed
            request = requests[index % len(requests)]
            if due is not None and due > time.monotonic():
                time.sleep(due - time.monotonic())
            sent = time.monotonic()
            start = sent if due is None else min(due, sent)  # a late send's wait counts (open loop)
            timeout = min(rpc_timeout_s, loop.deadline - sent)
            cut_by_time_bound = timeout < rpc_timeout_s
            if timeout <= 0:
                loop.record_unfinished()
                continue
            try:
                stub.Predict(request, timeout=timeout)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and cut_by_time_bound:
                    loop.record_unfinished()
                else:
                    loop.record_error(e.code(), e.details() or "")
                continue
            done = time.monotonic()
            loop.record_ok(done - start, done - sent)


def _connect_and_warm_up(
    target: str,
    timeout_s: float,
    channel_options: list,
    requests: list,
    warmup: int,
    warmup_s: float,
    rpc_timeout_s: float,
) -> None:
    """Waits for the channel, then sends `warmup` requests (at most `warmup_s` seconds); none is counted."""
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(target, options=channel_options) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise ValueError(
                f"cannot connect to {target} within {timeout_s:g} s; is the server running there?"
            ) from None
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        deadline = time.monotonic() + warmup_s
        for index in range(warmup):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                stub.Predict(requests[index % len(requests)], timeout=min(rpc_timeout_s, remaining))
            except grpc.RpcError:
                pass  # the measured run counts errors


def _latency_summary(latencies_s: list[float]) -> dict:
    if not latencies_s:
        return {f"p{p}": None for p in PERCENTILES} | {"max": None, "mean": None}
    ms = np.asarray(latencies_s) * 1000.0
    summary = {f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(ms, PERCENTILES))}
    return summary | {"max": float(ms.max()), "mean": float(ms.mean())}


def run(
    target: str,
    model_name: str,
    examples: Sequence[bytes],
    requests: int = DEFAULT_REQUESTS,
    duration_s: float = DEFAULT_DURATION_S,
    concurrency: int = DEFAULT_CONCURRENCY,
    signature: str = F.SERVING_SIGNATURE,
    batch: int = DEFAULT_BATCH,
    candidates: int = DEFAULT_CANDIDATES,
    *,
    version: Optional[int] = None,
    version_label: Optional[str] = None,
    allow_remote: bool = False,
    rate_qps: Optional[float] = None,
    warmup: int = 0,
    rpc_timeout_s: float = DEFAULT_RPC_TIMEOUT_S,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> dict:
    """Runs one closed-loop load test and returns its result.

    Args:
      target: "host:port" of a PredictionService (`xdctr serve`, `xdctr route`, TF Serving).
      model_name: the `model_spec.name` of every request.
      examples: serialized tf.Examples carrying the features of `xdctr.features`.
      requests: at most this many requests are sent (>= 1).
      duration_s: no request is sent, and none is left running, after this many seconds (> 0).
      concurrency: client threads, each with its own channel, one request in flight each.
      signature: `serving_default` (`batch` examples per request) or `score_candidates` (one
        context example and `candidates` candidates per request).
      batch: examples per `serving_default` request.
      candidates: candidates per `score_candidates` request.
      version, version_label: pin the served version (at most one of them).
      allow_remote: accept a target that is not a loopback address.
      rate_qps: send at this fixed rate (open loop, see the module docstring); None: closed loop.
      warmup: requests sent one at a time before the clock starts, and not counted (the first
        calls of a signature can include its tracing); bounded by `duration_s` too.
      rpc_timeout_s: deadline of one call (cut to the time left under `duration_s`).
      connect_timeout_s: how long to wait for the channel before giving up with ValueError.

    Returns:
      A dict: the settings; `sent`, `ok`, `errors` ({status code name: count}), `error_details`
      (the first message per code), `unfinished` (calls cut by the time bound), `elapsed_s`, `qps`
      (ok / elapsed), `rows_per_s`, `latency_ms` ({p50, p95, p99, max, mean} over successful
      requests, from when each was due; None when none succeeded), `call_latency_ms` (the same
      from when each was sent: equal in a closed loop; in an open loop it leaves out the time a
      request waited for a client thread), `stopped_by` ("requests" or "time").

    Raises:
      ValueError: a bad argument, a non-loopback target without `allow_remote`, or no server.
    """
    check_target(target, allow_remote)
    for name, value in (("requests", requests), ("concurrency", concurrency), ("batch", batch),
                        ("candidates", candidates)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"`warmup` must be a non-negative integer. Received: warmup={warmup!r}")
    for name, value in (("duration_s", duration_s), ("rpc_timeout_s", rpc_timeout_s),
                        ("connect_timeout_s", connect_timeout_s)):
        if not value > 0 or math.isinf(value):
            raise ValueError(f"`{name}` must be a positive, finite number of seconds. Received: {name}={value!r}")
    if rate_qps is not None and not (rate_qps > 0 and math.isfinite(rate_qps)):
        raise ValueError(f"`rate_qps` must be a positive number of requests per second. Received: {rate_qps!r}")
    if signature not in SIGNATURES:
        raise ValueError(f"`signature` must be one of {list(SIGNATURES)}. Received: signature={signature!r}")
    if not examples:
        raise ValueError("`examples` must hold at least one serialized tf.Example. Received: none.")
    if version is not None and version_label:
        raise ValueError(f"give `version` or `version_label`, not both. Received: {version=}, {version_label=}")

    rows = candidates if signature == F.SCORE_CANDIDATES_SIGNATURE else batch
    distinct = min(requests, MAX_DISTINCT_REQUESTS, max(1, math.ceil(len(examples) / rows)))
    prebuilt = build_requests(model_name, examples, signature, batch, candidates, distinct, version, version_label)
    channel_options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.use_local_subchannel_pool", 1),  # one connection per thread, like separate clients
    ]
    _connect_and_warm_up(target, connect_timeout_s, channel_options, prebuilt, warmup, duration_s, rpc_timeout_s)
    # Every thread's connection is up before the clock starts: connecting is not the server's time.
    channels = [grpc.insecure_channel(target, options=channel_options) for _ in range(concurrency)]
    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=connect_timeout_s)
    except grpc.FutureTimeoutError:
        for channel in channels:
            channel.close()
        raise ValueError(f"cannot connect {concurrency} clients to {target} within {connect_timeout_s:g} s.") from None

    start = time.monotonic()
    loop = _Loop(requests, start, duration_s, rate_qps)
    threads = [
        threading.Thread(target=_worker, args=(channel, prebuilt, loop, rpc_timeout_s), name=f"loadtest-{i}",
                         daemon=True)
        for i, channel in enumerate(channels)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        # Every call ends by the time bound (its deadline is cut to it); the slack covers scheduling.
        thread.join(timeout=max(loop.deadline - time.monotonic(), 0) + rpc_timeout_s)
    elapsed = time.monotonic() - start
    alive = sum(thread.is_alive() for thread in threads)
    if alive:
        raise RuntimeError(f"{alive} loadtest thread(s) still running {elapsed:.1f} s after the start.")

    ok = len(loop.latencies_s)
    return {
        "target": target,
        "model_name": model_name,
        "signature": signature,
        "rows_per_request": rows,
        "concurrency": concurrency,
        "rate_qps": rate_qps,
        "warmup": warmup,
        "requests_limit": requests,
        "duration_limit_s": duration_s,
        "sent": loop.sent,
        "ok": ok,
        "errors": dict(sorted(loop.errors.items())),
        "error_details": dict(sorted(loop.first_error.items())),
        "unfinished": loop.unfinished,
        "elapsed_s": elapsed,
        "qps": ok / elapsed if elapsed > 0 else 0.0,
        "rows_per_s": ok * rows / elapsed if elapsed > 0 else 0.0,
        "latency_ms": _latency_summary(loop.latencies_s),
        "call_latency_ms": _latency_summary(loop.call_latencies_s),
        "stopped_by": "requests" if loop.sent >= requests else "time",
    }


def format_summary(result: dict) -> str:
    """One line: what was run, throughput, latency percentiles and errors."""
    latency = result["latency_ms"]
    if latency["p50"] is None:
        latency_text = "latency ms: no successful request"
    else:
        latency_text = "latency ms " + " ".join(f"{k} {latency[k]:.2f}" for k in ("p50", "p95", "p99", "max"))
    errors = ", ".join(f"{code}={n}" for code, n in result["errors"].items()) or "none"
    rate = "" if result.get("rate_qps") is None else f" rate={result['rate_qps']:g}/s"
    return (
        f"loadtest {result['target']} {result['model_name']}/{result['signature']} "
        f"rows/request={result['rows_per_request']} concurrency={result['concurrency']}{rate}: "
        f"{result['ok']}/{result['sent']} ok in {result['elapsed_s']:.2f} s (stopped by {result['stopped_by']}), "
        f"{result['qps']:.1f} QPS, {result['rows_per_s']:.0f} rows/s, {latency_text}, "
        f"errors: {errors}, unfinished: {result['unfinished']}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `xdctr loadtest` flags."""
    parser.add_argument("--target", default="localhost:8500", help="host:port of a PredictionService (loopback only)")
    parser.add_argument("--model-name", default="xdctr", help="served model name")
    parser.add_argument("--examples", required=True, help="TFRecord file pattern of serialized tf.Examples (.gz: GZIP)")
    parser.add_argument("--max-examples", type=int, default=DEFAULT_MAX_EXAMPLES,
                        help="examples read from --examples and cycled through")
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="stop after this many requests")
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, help="stop after this many seconds")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="client threads (closed loop)")
    parser.add_argument("--rate", type=float, help="open loop: send this many requests per second (latency from "
                                                   "each request's due time)")
    parser.add_argument("--signature", choices=SIGNATURES, default=F.SERVING_SIGNATURE, help="signature to call")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=f"examples per {F.SERVING_SIGNATURE} request")
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES,
                        help=f"candidates per {F.SCORE_CANDIDATES_SIGNATURE} request")
    version = parser.add_mutually_exclusive_group()
    version.add_argument("--version", type=int, help="request this model version")
    version.add_argument("--version-label", help="request this version label (e.g. stable, canary)")
    parser.add_argument("--warmup", type=int, default=0, help="uncounted requests sent before the clock starts")
    parser.add_argument("--timeout", type=float, default=DEFAULT_RPC_TIMEOUT_S, help="deadline of one call, seconds")
    parser.add_argument("--allow-remote", action="store_true", help="accept a target that is not a loopback address")
    parser.add_argument("--out", help="write the result as JSON here")


def run_from_args(args: argparse.Namespace) -> int:
    """`xdctr loadtest`: runs the load test, prints the one-line summary, writes JSON with --out."""
    check_target(args.target, args.allow_remote)  # before reading any example
    if args.max_examples < 1:
        raise ValueError(f"--max-examples must be positive. Received: {args.max_examples}")
    examples = read_examples(args.examples, args.max_examples)
    result = run(
        args.target, args.model_name, examples, args.requests, args.duration, args.concurrency, args.signature,
        args.batch, args.candidates, version=args.version, version_label=args.version_label,
        allow_remote=args.allow_remote, rate_qps=args.rate, warmup=args.warmup, rpc_timeout_s=args.timeout,
    )
    print(format_summary(result))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0
