"""Grow or shrink the rollout workers of a running job, without restarting anything else.

    python -m cluster.scale --rollout 4                    # on the head node, or with RAY_ADDRESS set
    python -m cluster.scale --rollout 1 --namespace arcopo --address ray://head:10001

New workers receive the current weights before their first job; a retired worker finishes the job
it holds, so no group is lost or made twice. The driver applies the change between jobs.
"""

from __future__ import annotations

import argparse
import json
import sys


def set_rollout_workers(count: int, namespace: str = "arcopo") -> dict:
    """From any process connected to the cluster: ask the job's controller for `count` workers."""
    import ray

    controller = ray.get_actor("controller", namespace=namespace)
    return ray.get(controller.set_target.remote("rollout", count))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rollout", type=int, required=True, help="rollout workers wanted")
    parser.add_argument("--namespace", default="arcopo", help="the job's cluster.namespace (default: %(default)s)")
    parser.add_argument("--address", default="auto", help="Ray address (default: %(default)s)")
    args = parser.parse_intermixed_args(argv)
    import ray

    from cluster.local import ray_env_defaults

    ray_env_defaults()
    ray.init(address=args.address, namespace=args.namespace, log_to_driver=False)
    try:
        target = set_rollout_workers(args.rollout, args.namespace)
    except ValueError as exc:
        if "Failed to look up actor" in str(exc):
            print(f"no running job in namespace {args.namespace!r} (no 'controller' actor)", file=sys.stderr)
            return 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
