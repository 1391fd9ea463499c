#!/usr/bin/env python3
"""Print the path of one integration-test executable from cargo's JSON build messages.

Usage: cargo test --workspace --all-targets --no-run --message-format=json | test_binary.py NAME

Running the built binary directly keeps the workspace's feature set: `cargo test -p PKG` would
resolve features for PKG alone and rebuild a large part of the dependency graph.
"""

import json
import sys


def main(argv):
    if len(argv) != 2:
        sys.stderr.write(__doc__)
        return 2
    name = argv[1]
    found = []
    for line in sys.stdin:
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        target = msg.get("target") or {}
        if (
            msg.get("reason") == "compiler-artifact"
            and target.get("name") == name
            and "test" in target.get("kind", [])
            and msg.get("executable")
        ):
            found.append(msg["executable"])
    if len(found) != 1:
        sys.stderr.write(f"expected one test executable named {name}, found {found}\n")
        return 1
    print(found[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
