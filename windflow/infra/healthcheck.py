"""``python -m windflow.infra.healthcheck HOST:PORT [SERVICE]``: exit 0 iff SERVING.

The container healthcheck of every service in docker-compose.yml (a gRPC health Check,
like ``grpc_health_probe``, with nothing to install beyond the image's Python deps).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from windflow.infra.health import GrpcHealthProbe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m windflow.infra.healthcheck")
    parser.add_argument("address", help="host:port of a gRPC server")
    parser.add_argument("service", nargs="?", default="", help='service name (default "")')
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    args = parser.parse_args(argv)
    probe = GrpcHealthProbe(args.address, service=args.service, timeout_s=args.timeout)
    serving = asyncio.run(probe())
    print("SERVING" if serving else "NOT SERVING")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
