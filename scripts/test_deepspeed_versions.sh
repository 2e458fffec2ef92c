#!/usr/bin/env bash
# Run torchckpt's DeepSpeed tests against other DeepSpeed releases, each in a throw-away venv
# beside the project (.venv-deepspeed-<version>/), with the torch the main environment has.
#   scripts/test_deepspeed_versions.sh 0.17.1 0.18.5      (CI: the oldest supported and a middle one;
#                                                         the newest is the main environment's)
# Extra pytest arguments for every version: DEEPSPEED_VERSIONS_PYTEST_ARGS="--deselect ...".
# Nothing of the main environment changes. Each venv keeps its own compiled-op cache.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$PWD
py=${PYTHON:-python}
torch_version=$($py -c 'import torch; print(torch.__version__.split("+")[0])')
tests=(tests/test_engine.py tests/test_engine_async.py tests/test_deepspeed_dropin.py tests/test_distributed.py)
status=0
for version in "$@"; do
    venv="$here/.venv-deepspeed-$version"
    echo "== deepspeed $version (torch $torch_version): ${tests[*]}"
    if [[ ! -x "$venv/bin/python" ]]; then
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install -q --upgrade pip
        # The exact torch of the main environment (never a range: that could pull a CUDA build).
        "$venv/bin/python" -m pip install -q "torch==$torch_version"
        "$venv/bin/python" -m pip install -q numpy ipython ipywidgets tqdm xxhash filelock safetensors \
            pytest pytest-timeout hypothesis setuptools wheel
        # No build isolation: DeepSpeed's sdist build must see this torch, not fetch another.
        "$venv/bin/python" -m pip install -q --no-build-isolation "deepspeed==$version"
    fi
    if ! (export PYTHONPATH="$here" DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$venv/torch_extensions"
          "$venv/bin/python" -m pytest -p no:cacheprovider -q --timeout=600 "${tests[@]}" \
              ${DEEPSPEED_VERSIONS_PYTEST_ARGS:-}); then
        echo "!! deepspeed $version: failures above" >&2
        status=1
    fi
done
exit $status
