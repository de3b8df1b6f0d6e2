#!/usr/bin/env bash
# The GPU script lives in experiments/ (it runs experiments, not just timings); this name stays for the
# developers' guide and old notes. Same arguments: experiments/gpu_run.sh --help
exec "$(cd "$(dirname "$0")/.." && pwd)/experiments/gpu_run.sh" "$@"
