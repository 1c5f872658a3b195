"""Generated protobuf and gRPC code for windflow.v1 (tools/gen_protos.py)."""
