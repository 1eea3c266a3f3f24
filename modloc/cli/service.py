"""The service verbs of ``modloc``: ``serve`` (the gRPC server) and ``client`` (calls to one).
"""

from __future__ import annotations

import argparse
import json
import logging

from modloc.cli.common import add_field_options, field_values, positive_int, print_json
from modloc.cli.runtime import add_pipeline_options, pipeline_settings

# ServerConfig's limits, each a flag of serve
LIMITS = ("max_message_bytes", "max_frames", "max_streams", "max_inflight_videos",
          "max_stream_videos", "max_kserve_requests", "max_kserve_bytes", "max_connection_streams",
          "max_connections", "max_id_bytes", "max_top_k")
LIVE_LIMITS = ("max_live_streams", "max_live_frames", "live_idle_seconds")


def add_commands(subparsers) -> None:
    """Register these verbs on ``modloc``'s subparsers."""
    _add_serve(subparsers)
    _add_client(subparsers)


def _add_serve(subparsers) -> None:
    from modloc.engine.runtime.batcher import BatcherConfig
    from modloc.engine.runtime.live import LiveConfig
    from modloc.engine.runtime.ranking_stores import RedisSettings
    from modloc.engine.service.config import ServerConfig

    defaults = ServerConfig.__dataclass_fields__
    parser = subparsers.add_parser(
        "serve",
        help="serve the modloc.v1 gRPC API (plus KServe v2, health, reflection)",
        description=(
            "Load exported artifacts and serve Localize/Ingest streams, per-class rankings "
            "(TopSegments, Submission), Stats and ModelInfo over gRPC. Prints 'listening on "
            "HOST:PORT' once serving (port 0 picks a free port). SIGTERM/SIGINT drain: health "
            "turns NOT_SERVING, open streams get --grace seconds, a final snapshot is written; "
            "the exit status is 0, or 75 when the state directory could not be written while "
            "serving (the files hold every acknowledged video: restart to recover)."
        ),
    )
    add_pipeline_options(parser)
    parser.add_argument("--address", default=defaults["address"].default,
                        help="host:port to bind (default %(default)s)")
    parser.add_argument("--state-dir", help="directory of the durable rankings (without it, "
                        "or --rankings, the server serves Localize only)")
    redis = RedisSettings.__dataclass_fields__
    parser.add_argument("--rankings", metavar="URL",
                        help="keep the rankings in Redis instead, shared by a fleet of servers: "
                        "redis://host:port (a server, or any node of a Redis Cluster)")
    parser.add_argument("--redis-wait-replicas", type=int, default=redis["wait_replicas"].default,
                        help="acknowledge a video once this many replicas of each Redis master "
                        "it was written to hold it (WAIT; default %(default)s)")
    parser.add_argument("--redis-wait-timeout", type=float, default=redis["wait_timeout"].default,
                        help="seconds a WAIT may take before the videos count as not "
                        "acknowledged (default %(default)s)")
    parser.add_argument("--redis-prefix", default=redis["prefix"].default,
                        help="prefix of the rankings' keys (default %(default)s)")
    parser.add_argument("--accept-state-loss", action="store_true",
                        help="open a damaged state directory (a file its MANIFEST names missing, "
                        "shorter than recorded, or corrupt): keep what is intact, drop the rest "
                        "(logged); without it such a directory is refused")
    parser.add_argument("--accept-settings-change", action="store_true",
                        help="keep adding to rankings that other models or fusion settings "
                        "filled (the state directory records them; without it a change is refused)")
    parser.add_argument("--fresh-state", action="store_true",
                        help="start new rankings: the state directory's files are moved into a "
                        "replaced-<time>/ folder inside it")
    parser.add_argument("--processes", type=int, default=1,
                        help="processes sharing the port via SO_REUSEPORT (Localize only; "
                        "refused with --state-dir)")
    parser.add_argument("--snapshot-seconds", type=float, default=defaults["snapshot_seconds"].default)
    parser.add_argument("--snapshot-videos", type=int, default=defaults["snapshot_videos"].default)
    add_field_options(parser, ServerConfig, LIMITS)
    add_field_options(parser, ServerConfig, LIVE_LIMITS)
    live = LiveConfig()
    parser.add_argument("--live-refresh-frames", type=positive_int, default=live.refresh_frames,
                        help="LocalizeLive: refresh a stream's candidates every this many frames "
                             "(default %(default)s)")
    parser.add_argument("--live-block-frames", type=positive_int, default=live.block_frames,
                        help="LocalizeLive: a stream past 300 frames keeps its sums in blocks of "
                             "this many frames (default %(default)s)")
    parser.add_argument("--live-max-queued-windows", type=positive_int,
                        default=live.max_queued_windows,
                        help="LocalizeLive: windows waiting for the engine, server-wide "
                             "(default %(default)s)")
    parser.add_argument("--batch-wait", type=float, default=BatcherConfig().max_wait,
                        help="seconds the oldest queued video waits for company (default %(default)s)")
    parser.add_argument("--max-queued-videos", type=int, default=BatcherConfig().max_queued_videos)
    parser.add_argument("--grace", type=float, default=defaults["grace_seconds"].default,
                        help="seconds a drain waits for open streams (default %(default)s)")
    parser.add_argument("--token-file", help="bearer tokens, one a line")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="allow listening beyond loopback without tokens")
    parser.add_argument("--tls-cert", help="server certificate (PEM)")
    parser.add_argument("--tls-key", help="server private key (PEM)")
    parser.add_argument("--tls-client-ca", help="require client certificates signed by this CA")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    parser.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from modloc.engine.runtime.batcher import BatcherConfig
    from modloc.engine.runtime.live import LiveConfig
    from modloc.engine.runtime.ranking_stores import RedisSettings
    from modloc.engine.runtime.topk import StatePolicy
    from modloc.engine.service.app import serve
    from modloc.engine.service.config import ServerConfig

    pipeline, backend_options = pipeline_settings(args)
    redis = None if args.rankings is None else RedisSettings(
        args.rankings, wait_replicas=args.redis_wait_replicas, wait_timeout=args.redis_wait_timeout,
        prefix=args.redis_prefix)
    batcher = BatcherConfig(max_batch_videos=args.video_batch, max_wait=args.batch_wait,
                            max_queued_videos=args.max_queued_videos)
    config = ServerConfig(
        artifacts=args.artifacts, video=args.video, segment=args.segment, backend=args.backend,
        backend_options=backend_options, pipeline=pipeline, batcher=batcher,
        address=args.address, state_dir=args.state_dir, redis=redis, snapshot_seconds=args.snapshot_seconds,
        state_policy=StatePolicy(accept_loss=args.accept_state_loss,
                                 accept_settings=args.accept_settings_change, fresh=args.fresh_state),
        snapshot_videos=args.snapshot_videos, **field_values(args, ServerConfig, LIMITS),
        **field_values(args, ServerConfig, LIVE_LIMITS),
        live=LiveConfig(refresh_frames=args.live_refresh_frames, block_frames=args.live_block_frames,
                        max_queued_windows=args.live_max_queued_windows),
        grace_seconds=args.grace, processes=args.processes,
        token_file=args.token_file, insecure_no_auth=args.insecure_no_auth,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        metrics_port=args.metrics_port)
    # the server's events (one key=value line each) go to stderr whatever -v says
    logging.getLogger("modloc.server").setLevel(logging.INFO)
    return serve(config, on_ready=lambda address: print(f"listening on {address}", flush=True))


def _add_client(subparsers) -> None:
    parser = subparsers.add_parser(
        "client",
        help="talk to a modloc server: localize, ingest, live, top, submission, stats",
        description="Send TFRecord videos to a running 'modloc serve', or read its rankings.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("address", help="host:port of the server")
    common.add_argument("--token-file", help="file whose first token is sent as the bearer token")
    common.add_argument("--tls-ca", help="CA certificate of the server (PEM); enables TLS")
    common.add_argument("--timeout", type=float, help="seconds per call")
    common.add_argument("--max-message-bytes", type=int, help="the server's message limit")
    localize = actions.add_parser("localize", parents=[common], help="localize videos; JSON lines out")
    localize.add_argument("--data", required=True, nargs="+", help="frame-level TFRecords")
    localize.add_argument("--threshold", type=float, default=0.0)
    localize.add_argument("--max-segments", type=int, default=0)
    localize.add_argument("--window", type=positive_int, default=32,
                          help="unanswered videos at most (keep under the server's "
                               "--max-inflight-videos)")
    ingest = actions.add_parser("ingest", parents=[common], help="ingest videos into the rankings")
    ingest.add_argument("--data", required=True, nargs="+", help="frame-level TFRecords")
    ingest.add_argument("--window", type=positive_int, default=32, help="unacknowledged videos at most")
    ingest.add_argument("--reconnect-timeout", type=float, default=60.0,
                        help="seconds each retry waits for the server to come back before "
                             "giving up (default 60)")
    top = actions.add_parser("top", parents=[common], help="one class's ranking")
    top.add_argument("class_id", type=int)
    top.add_argument("--k", type=int, default=10)
    top.add_argument("--offset", type=int, default=0)
    submission = actions.add_parser("submission", parents=[common], help="download the Kaggle CSV")
    submission.add_argument("--out", required=True)
    actions.add_parser("stats", parents=[common], help="the server's counters")
    live = actions.add_parser(
        "live", parents=[common], help="replay a video through LocalizeLive; events as they come",
        description="Replay one video of a TFRecord as a live stream (1 frame per second at "
                    "--speed 1) and print the server's events as they arrive: candidate "
                    "updates, one line per completed window, the final localization.")
    live.add_argument("--data", required=True, nargs="+", help="frame-level TFRecords holding the video")
    live.add_argument("--video-id", required=True, help="the video to replay (the stream's id)")
    live.add_argument("--speed", type=float, default=1.0,
                      help="times real time (default 1: a frame a second; 0: as fast as possible)")
    live.add_argument("--chunk-frames", type=positive_int, default=1, help="frames per message")
    live.add_argument("--threshold", type=float, default=0.0)
    live.add_argument("--top-n", type=int, default=3, help="scores per window event (0: all)")
    live.add_argument("--refresh-frames", type=int, default=0,
                      help="candidate refresh cadence in frames (0: the server's)")
    live.add_argument("--ingest", action="store_true",
                      help="ingest the finished stream into the server's rankings")
    live.add_argument("--json", action="store_true", help="one JSON object per event")
    parser.set_defaults(handler=_run_client)


def _run_client(args: argparse.Namespace) -> int:
    import grpc

    try:
        return _client_action(args)
    except grpc.RpcError as error:
        raise RuntimeError(_rpc_failure(error, args)) from error


def _replay_live(client, args: argparse.Namespace) -> None:
    """``client live``: one video replayed at ``--speed``, its events printed as they come."""
    import numpy as np
    from google.protobuf.json_format import MessageToDict

    from modloc.engine.base.io.readers import read_videos
    from modloc.engine.service.client import LiveTimer, replay

    video = next((v for v in read_videos(args.data) if v.id == args.video_id), None)
    if video is None:
        raise ValueError(f"no video {args.video_id!r} in {' '.join(args.data)}")
    timer = LiveTimer()
    latencies = []
    events = client.localize_live(video.id, replay(video.features, args.chunk_frames, args.speed),
                                  threshold=args.threshold, top_n=args.top_n,
                                  refresh_frames=args.refresh_frames, ingest=args.ingest, timer=timer)
    for event in events:
        kind = event.WhichOneof("event")
        if kind == "window":
            latencies.append(timer.latency(event.window))
        if args.json:
            print(json.dumps({kind: MessageToDict(getattr(event, kind),
                                                  always_print_fields_with_no_presence=True)}), flush=True)
        elif kind == "candidates":
            update = event.candidates
            best = ", ".join(f"{c.class_id} {c.name!r} {c.video_score:.3f}" for c in update.candidates[:3])
            print(f"candidates v{update.version} (from {update.frames} frames): {best}, ...", flush=True)
        elif kind == "window":
            window = event.window
            scores = ", ".join(f"{s.class_id} {s.score:.3f}" for s in window.scores) or "-"
            print(f"window {window.start_seconds:>5}s{' (partial)' if window.partial else ''} "
                  f"v{window.candidates_version}: {scores}  [{latencies[-1] * 1000:.0f} ms]", flush=True)
        else:
            final = event.final
            line = (f"final: {final.localization.num_frames} frames, "
                    f"{len(final.localization.candidates)} candidates")
            if final.HasField("ingest"):
                line += f"; ingest {final.ingest.Status.Name(final.ingest.status)}"
            if latencies:
                line += (f"; {len(latencies)} windows, latency p50 {np.percentile(latencies, 50) * 1000:.0f} ms, "
                         f"p99 {np.percentile(latencies, 99) * 1000:.0f} ms")
            print(line, flush=True)


def _rpc_failure(error, args: argparse.Namespace) -> str:
    """A failed call in one line: the status code's name and what the server said."""
    import grpc

    code, details = error.code(), error.details()
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"UNAVAILABLE: the server at {args.address} could not be reached ({details})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and args.timeout is not None:
        return (f"DEADLINE_EXCEEDED: the server at {args.address} did not answer within "
                f"--timeout {args.timeout:g} s")
    return f"{code.name}: {details}"


def _acknowledged(acks) -> str:
    duplicates = sum(ack.status == ack.DUPLICATE for ack in acks)
    return f"{len(acks) - duplicates} videos ({duplicates} duplicates)"


def _as_json(message) -> dict:
    """A message as JSON data, every field shown (zeros too: a script reading a counter
    must find it) and 64-bit integers as numbers: protobuf's JSON mapping writes them as
    strings, which a script would have to convert back."""
    from google.protobuf.json_format import MessageToDict

    return _integers(MessageToDict(message, always_print_fields_with_no_presence=True),
                     message.DESCRIPTOR)


def _integers(data: dict, descriptor) -> dict:
    """``data`` (MessageToDict's of a ``descriptor`` message) with its 64-bit integer fields,
    map values and nested messages' ones included, as ints."""
    from google.protobuf.descriptor import FieldDescriptor

    wide = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)
    for field in descriptor.fields:
        if field.json_name not in data:
            continue
        value = data[field.json_name]
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            if entry.fields_by_name["value"].cpp_type in wide:
                data[field.json_name] = {key: int(item) for key, item in value.items()}
        elif entry is not None:
            for item in value if isinstance(value, list) else [value]:
                _integers(item, entry)
        elif field.cpp_type in wide:
            data[field.json_name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return data


def _client_action(args: argparse.Namespace) -> int:
    import sys

    import grpc

    from modloc.engine.service.client import LocalizationClient
    from modloc.engine.service.config import DEFAULT_MAX_MESSAGE_BYTES

    token = None
    if args.token_file:
        from modloc.engine.service.security import load_tokens

        token = load_tokens(args.token_file)[0]
    with LocalizationClient(args.address, token=token, tls_ca=args.tls_ca, timeout=args.timeout,
                            max_message_bytes=args.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES) as client:
        if args.action == "localize":
            for response in client.localize(args.data, args.threshold, args.max_segments,
                                            window=args.window):
                print(json.dumps(_as_json(response)))
        elif args.action == "ingest":
            acks = []
            try:
                client.ingest(args.data, window=args.window, progress=None,
                              reconnect_timeout=args.reconnect_timeout, on_ack=acks.append)
            except (grpc.RpcError, ValueError, OSError) as error:
                # one line: what stopped it (the file and record, or the server's refusal)
                # and how far it got, since every acknowledged video is in the rankings
                what = _rpc_failure(error, args) if isinstance(error, grpc.RpcError) else str(error)
                raise RuntimeError(f"{what}; {_acknowledged(acks)} acknowledged before it (in the "
                                   "rankings; sending the same files again skips them as "
                                   "duplicates)") from error
            print(f"ingested {_acknowledged(acks)}")
        elif args.action == "top":
            entries = client.top_segments(args.class_id, args.k, args.offset)
            for entry in entries:
                print(f"{entry.rank}\t{entry.video_id}:{entry.start_seconds}\t{entry.score:.6g}")
            if not entries:  # said on stderr: stdout stays the (empty) ranking for scripts
                print(f"class {args.class_id} has no ranked segment from rank {args.offset} on "
                      "(nothing ingested for it yet)", file=sys.stderr)
        elif args.action == "submission":
            data = client.submission(args.out)
            print(f"wrote {args.out} ({len(data)} bytes)")
        elif args.action == "live":
            _replay_live(client, args)
        else:
            print_json(_as_json(client.stats()))
    return 0
