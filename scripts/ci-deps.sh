#!/usr/bin/env bash
# System packages the test suite uses when present: TeX, to compile the report's LaTeX tables,
# and headless Chromium, to open the report page (index.html) as a reader's browser would.
# pdflatex comes with texlive-latex-base; booktabs.sty (\toprule, \midrule, \bottomrule) is in
# texlive-latex-recommended (Debian 12: `dpkg -S booktabs.sty`), so both are needed.
set -euo pipefail
need=()
command -v pdflatex >/dev/null 2>&1 || need+=(texlive-latex-base)
if ! { command -v kpsewhich >/dev/null 2>&1 && kpsewhich booktabs.sty >/dev/null 2>&1; }; then
  need+=(texlive-latex-recommended)
fi
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
kpsewhich booktabs.sty >/dev/null || { echo "ci-deps: booktabs.sty still not found" >&2; exit 1; }
