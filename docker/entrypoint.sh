#!/bin/sh
# `docker run IMAGE defend --model ...` runs `ubt defend --model ...`. A program the image has runs as
# given: that is what Prefect's Kubernetes worker passes as container args (`prefect flow-run execute`)
# and what a shell or `ray start` needs. (KubeRay replaces the entrypoint altogether.)
set -e
if [ "$#" -eq 0 ]; then
    exec ubt --help
fi
case "$(command -v "$1" 2>/dev/null)" in
    /*) exec "$@" ;;  # an executable on PATH; builtins such as `eval` fall through to ubt
esac
exec ubt "$@"
