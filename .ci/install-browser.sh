#!/usr/bin/env bash
# A headless browser for tests/viz/test_report.py (the HTML report is checked in a
# real browser; without one that test is skipped). Debian/Ubuntu, as root.
set -euo pipefail
apt-get update -q
apt-get install -y -q chromium chromium-driver
python -m pip install -q "selenium>=4.10"
chromium --version
