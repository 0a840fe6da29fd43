#!/usr/bin/env bash
# System packages the test suite uses when present: TeX (the LaTeX tables are compiled).
set -euo pipefail
need=()
command -v pdflatex >/dev/null || need+=(texlive-latex-base texlive-latex-recommended)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
