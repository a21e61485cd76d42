#!/usr/bin/env bash
# Build the documentation site, offline and strict: bash scripts/build_docs.sh [SITE_DIR]
#
# 1. Regenerates the figures every page needs into docs/figures/ (git-ignored), with every
#    figure script: scripts/make_figures.py (the classic questions), scripts/site_figures.py.
# 2. mkdocs build --strict into SITE_DIR (default: site/). KaTeX and the iframe-worker shim are
#    copied from node_modules/ (run `npm ci` first); the site makes no network request.
# Needs the docs extra: pip install -e ".[docs]".
set -euo pipefail
cd "$(dirname "$0")/.."
site_dir="${1:-site}"

if [[ ! -f node_modules/katex/package.json || ! -f node_modules/iframe-worker/package.json ]]; then
    echo "build_docs: KaTeX or iframe-worker missing from node_modules/: run \`npm ci\`" >&2
    exit 1
fi

for script in scripts/make_figures.py scripts/site_figures.py scripts/beyond_figures.py scripts/accuracy_grid.py scripts/float32_accuracy.py; do
    echo "build_docs: python $script"
    python "$script"
done

export NO_MKDOCS_2_WARNING=1  # mkdocs-material's banner about MkDocs 2.0; we pin mkdocs<2
python -m mkdocs build --strict --site-dir "$site_dir"
echo "build_docs: site in $site_dir/ (open $site_dir/index.html)"
