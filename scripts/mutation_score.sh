#!/usr/bin/env bash
# Mutation score of the mathematical modules (issue 10): mutmut over the modules listed in
# pyproject.toml's [tool.mutmut] section, each mutant run against the default test suite's tests
# that reach it. Several hours on 2 cores (6,601 mutants); it need not run in CI.
#
#   pip install -e ".[test,mutation]"
#   bash scripts/mutation_score.sh [DIR]      # DIR: a fresh worktree of HEAD (default: a temp dir)
#
# mutmut writes its mutants into DIR/mutants/, so the run happens in a separate git worktree and
# leaves this checkout alone. At the end, scripts/mutation_score.py prints the score per module
# (with the equivalent mutants of docs/data/mutation-triage.tsv taken out of the denominator).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
dir=${1:-$(mktemp -d)/toyvae-mutation}
git -C "$root" worktree add --detach "$dir" HEAD
cd "$dir"
mutmut run --max-children "${JOBS:-2}"
mutmut results --all true > results.txt
python scripts/mutation_score.py results.txt --triage "$root/docs/data/mutation-triage.tsv" \
    --commit "$(git rev-parse --short HEAD)"
echo "mutation_score: results in $dir/results.txt (remove with: git worktree remove --force $dir)"
