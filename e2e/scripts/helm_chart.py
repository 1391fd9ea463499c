#!/usr/bin/env python3
"""Lint and render the Shoal chart offline with the real Helm SDK (PyPI helm-python-sdk).

Called by e2e/tests/chart.rs; prints one JSON object on stdout:
  {"sdk": "<helm version>", "sets": [{"name", "values_file", "lint": {...}, "rendered": {template: manifest}
   | "error": "<render error>"}]}
Usage: helm_chart.py CHART_DIR RELEASE NAMESPACE [VALUES_FILE ...]   ("-" = the chart's defaults)
Exit status 3 when the SDK is missing, with a message telling how to install it.
"""

import json
import sys

try:
    import helm_python as helm
except ImportError as err:  # the message the Rust test shows verbatim
    sys.stderr.write(
        f"the Helm SDK for Python is not installed ({err}); run `make deps` "
        "(or `python3 -m pip install helm-python-sdk`)\n"
    )
    sys.exit(3)


def load_values(path):
    if path == "-":
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # The SDK's own YAML reader, so values parse exactly as `helm -f` parses them.
    return helm.values_from_yaml(text)


def main(argv):
    if len(argv) < 4:
        sys.stderr.write(__doc__)
        return 2
    chart_dir, release, namespace, files = argv[1], argv[2], argv[3], argv[4:] or ["-"]
    chart = helm.Chart.load(chart_dir)
    sets = []
    for values_file in files:
        values = load_values(values_file)
        entry = {"values_file": values_file}
        entry["lint"] = helm.lint(chart_dir, values, strict=True, namespace=namespace)
        try:
            entry["rendered"] = chart.render(
                values, name=release, namespace=namespace, is_install=True
            )
        except helm.HelmError as err:
            entry["error"] = str(err)
        sets.append(entry)
    print(json.dumps({"sdk": helm.helm_sdk_version(), "sets": sets}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
