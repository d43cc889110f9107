#!/usr/bin/env python
"""Materialise the demo base model under models/base/smollm2-135m-instruct (idempotent).

Usage: python scripts/fetch_demo_model.py [--dest DIR] [--force]
Same as `edgetune models fetch-demo`.
"""

import argparse

from edgetune.demo_model import fetch_demo

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dest", default=None)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    fetch_demo(args.dest, force=args.force)
