"""Pieces every Windflow service shares: gRPC plumbing, etcd/NATS names, telemetry."""
